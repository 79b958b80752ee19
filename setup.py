"""Maps the top-level stage folders onto the ``dinoforge.*`` namespace.

The repository keeps one folder per stage (``core/``, ``pretrain/``, ...), but installing the toolkit must
not claim generic import names such as ``core`` or ``serve``. Every folder is therefore installed as
``dinoforge.<stage>``; ``dinoforge`` itself is an implicit namespace package.
"""

from setuptools import find_packages, setup

STAGES = ("core", "curate", "pretrain", "distill", "export", "serve")

packages: list[str] = []
package_dir: dict[str, str] = {}
for stage in STAGES:
    package_dir[f"dinoforge.{stage}"] = stage
    packages.append(f"dinoforge.{stage}")
    packages += [f"dinoforge.{stage}.{sub}" for sub in find_packages(stage)]

setup(
    packages=packages,
    package_dir=package_dir,
    # *.html/*.css/*.js: the search page served by `dinoforge serve` (serve/static/); *.npz: the copy
    # descriptor's trained head (curate/weights/copy_mnv2.npz)
    package_data={stage_pkg: ["**/*.yaml", "**/*.json", "**/*.npz", "**/*.pbtxt", "**/*.html", "**/*.css", "**/*.js",
                              "py.typed"] for stage_pkg in packages},
    include_package_data=True,
)
