"""effdstl: the studies of Song et al. (ACM MM 2023, "EffDstl") as an importable library and a CLI.

Layout follows the data: data -> models -> targets/losses -> distillers -> engine -> launch ->
studies -> results/plots. Only ``launch`` knows about submitit/Slurm; only ``cli`` knows Typer.
"""

__version__ = "0.1.0"
