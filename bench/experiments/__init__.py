"""One-off experiments: each measured one question once, and backs a decision (README.md here)."""
