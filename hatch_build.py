"""Wheel build hook: the engine's per-change modules compiled with mypyc.

Every observed change runs through these modules, and compiled they take about an eighth fewer
instructions per merged change (bench/RESULTS.md). The sources are ordinary typed Python and stay
in the wheel; Python imports the compiled module where one is present. ``SYNCBRIDGE_PURE=1`` at
install time, or an editable install, leaves everything interpreted; so does a machine without a C
compiler or the Python headers, with a warning.
"""

from __future__ import annotations

import os
import sys
import tempfile
from pathlib import Path
from typing import Any

from hatchling.builders.hooks.plugin.interface import BuildHookInterface


class CompiledCore(BuildHookInterface):  # type: ignore[type-arg]
    PLUGIN_NAME = "custom"

    def initialize(self, version: str, build_data: dict[str, Any]) -> None:
        if self.target_name != "wheel" or version == "editable" or os.environ.get("SYNCBRIDGE_PURE"):
            return
        try:
            built = self._compile([str(Path("src", m)) for m in self.config["modules"]])
        except Exception as err:  # no C compiler or Python headers: the interpreted engine works the same
            print(f"syncbridge: the engine was not compiled ({type(err).__name__}: {str(err)[:160]}); installing it interpreted, "
                  "which is slower per change (install a C compiler and the Python headers to compile it)", file=sys.stderr)
            return
        for path, name in built:
            build_data["force_include"][path] = name
        build_data["pure_python"] = False
        build_data["infer_tag"] = True

    def _compile(self, modules: list[str]) -> list[tuple[str, str]]:
        """The compiled modules as (file built, path in the wheel)."""
        from mypyc.build import mypycify
        from setuptools import Distribution

        out = Path(tempfile.mkdtemp(prefix="syncbridge-mypyc-"))
        here = os.getcwd()
        os.chdir(self.root)  # mypyc names modules by their path: src/syncbridge/x.py is syncbridge.x
        try:
            extensions = mypycify(modules, opt_level="3", target_dir=str(out / "c"))
            dist = Distribution({"name": "syncbridge", "ext_modules": extensions})
            build = dist.get_command_obj("build_ext")
            build.build_lib = str(out / "lib")  # type: ignore[attr-defined]
            build.build_temp = str(out / "tmp")  # type: ignore[attr-defined]
            build.ensure_finalized()
            build.run()
        finally:
            os.chdir(here)
        return [(str(so), str(so.relative_to(out / "lib"))) for so in (out / "lib").rglob("*.so")]
