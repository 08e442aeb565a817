"""The s3 search protocol: document formats (and, with issue 6, prompt, action parsing, D_s3, episodes)."""
