// GPU tests of the cosine ops: being merged.
