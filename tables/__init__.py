"""The paper's tables from result records: published numbers (``paper``), table specs
(``specs``), collation (``collate``), Markdown/LaTeX/CSV output and the CLI (``render``),
figures (``figures``). Torch-free: run ``python tables/render.py --help``."""
