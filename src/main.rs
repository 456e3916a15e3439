use clap::Parser;

fn main() -> anyhow::Result<()> {
    keep_freed_memory();
    sentence_mtl::cli::run(sentence_mtl::cli::Cli::parse())
}

/// glibc hands large freed blocks back to the OS, so every training step would
/// page-fault (and zero) its activations and gradients afresh: about a sixth of
/// a step on the CPU. Keep blocks up to glibc's largest mmap threshold (32 MiB)
/// on the heap and never trim it.
fn keep_freed_memory() {
    #[cfg(all(target_os = "linux", target_env = "gnu"))]
    // SAFETY: mallopt only changes allocator tuning; called before any thread starts.
    unsafe {
        libc::mallopt(libc::M_MMAP_THRESHOLD, 32 << 20);
        libc::mallopt(libc::M_TRIM_THRESHOLD, i32::MAX);
        libc::mallopt(libc::M_TOP_PAD, 256 << 20);
    }
}
