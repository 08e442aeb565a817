"""The s3 search protocol: prompt, action parsing, document formats, D_s3, batched multi-turn episodes."""
