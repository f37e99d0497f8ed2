"""`python -m foundry_mlx` is the `foundry-mlx` command (useful where scripts are not on PATH)."""

from .cli import main

main()
