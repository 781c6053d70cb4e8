from .cli import main

main(prog_name="hlh_mlx")
