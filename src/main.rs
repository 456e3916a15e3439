fn main() -> anyhow::Result<()> {
    sentence_mtl::runtime::keep_freed_memory();
    sentence_mtl::cli::run(sentence_mtl::cli::Cli::parse_args())
}
