//! Where the shared data lives (`shared/` holds TweetEval and the
//! sentence-transformers reference outputs; never copied into the repo).
//! One definition, included by every test file that reads it.

use std::path::PathBuf;

/// `$SENTENCE_MTL_SHARED`, else `shared/` beside the crate (CI's layout), else
/// two levels up (a git worktree under `wt/` of the checkout).
pub fn shared_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("SENTENCE_MTL_SHARED") {
        return PathBuf::from(dir);
    }
    let crate_dir = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    let beside = crate_dir.join("../shared");
    let above = crate_dir.join("../../shared");
    if !beside.is_dir() && above.is_dir() {
        above
    } else {
        beside
    }
}
