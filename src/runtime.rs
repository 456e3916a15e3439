//! Process-wide settings that the CLI and the benchmarks apply at start-up.

/// glibc hands large freed blocks back to the OS, so every batch (and every
/// training step) would page-fault and zero its activations afresh: about a
/// sixth of a CPU training step and of an encode. This keeps blocks up to
/// glibc's largest mmap threshold (32 MiB) on the heap and never trims it:
/// the process keeps its peak memory in exchange. A no-op off glibc.
/// Call it once, early (the `sentence-mtl` binary does).
pub fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning (under glibc's own lock).
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}
