//! TweetEval data loading and batching (being written).
