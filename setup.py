"""Packaging: one import namespace ``postgate`` whose parts live at the top of the repository.

``postgate.outbound`` is ``outbound/``, ``postgate.inbound`` is ``inbound/``, ``postgate.policy`` is
``policy/``. Every package below them is found here, so a new subpackage can never be left out of a wheel.
Everything else about the project is in pyproject.toml.
"""

from setuptools import find_packages, setup

PARTS = {"postgate.outbound": "outbound", "postgate.inbound": "inbound", "postgate.policy": "policy"}

packages = ["postgate", *find_packages(where=".", include=["postgate.*"])]
package_dir = {"postgate": "postgate"}
for name, folder in PARTS.items():
    package_dir[name] = folder
    packages += [name, *(f"{name}.{sub}" for sub in find_packages(where=folder))]

setup(packages=sorted(set(packages)), package_dir=package_dir)
