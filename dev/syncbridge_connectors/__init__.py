"""For editable installs only (``pip install -e .``): ``syncbridge_connectors`` is the checkout's
``connectors/`` folder, as the wheel's ``sources`` mapping makes it in a normal install."""

from pathlib import Path

__path__ = [str(Path(__file__).resolve().parents[2] / "connectors")]
