//! The text-preparation flags (`--emoji`, `--unescape`, `--split-hashtags`,
//! `--emoticons`, `--shorten-elongations`),
//! shared by `train` and the commands that run the encoder.

use crate::model::text::{EmojiMode, TextPrep};

/// How texts are prepared before tokenisation; all off by default.
#[derive(Debug, Clone, Default, clap::Args)]
pub struct TextPrepArgs {
    /// Emoji before tokenisation: keep (BERT's vocabulary maps them to
    /// `[UNK]`) or text (each written as its name, "face with tears of joy").
    #[arg(long, value_enum, default_value_t = EmojiMode::Keep)]
    pub emoji: EmojiMode,
    /// Undo the escapes tweets carry (a literal `\n`, `\u2019`, `&amp;`)
    /// before tokenisation.
    #[arg(long)]
    pub unescape: bool,
    /// Split camel-cased hashtags into their words (`#FaceYourFears` →
    /// `#Face Your Fears`) before tokenisation.
    #[arg(long)]
    pub split_hashtags: bool,
    /// Write ASCII emoticons as the names of the emoji they stand for
    /// (`:)` → "slightly smiling face", `<3` → "red heart").
    #[arg(long)]
    pub emoticons: bool,
    /// Write a letter repeated three or more times twice (`soooo` → `soo`).
    #[arg(long)]
    pub shorten_elongations: bool,
}

impl TextPrepArgs {
    /// The settings these flags name.
    pub fn prep(&self) -> TextPrep {
        TextPrep {
            emoji: self.emoji,
            unescape: self.unescape,
            split_hashtags: self.split_hashtags,
            emoticons: self.emoticons,
            shorten_elongations: self.shorten_elongations,
        }
    }
}
