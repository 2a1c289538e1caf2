import re
from pathlib import Path

from setuptools import find_packages, setup

here = Path(__file__).parent
version = re.search(r'__version__ = "([^"]+)"', (here / "hedwig" / "__init__.py").read_text()).group(1)
requires = [
    line.strip()
    for line in (here / "requirements.txt").read_text().splitlines()
    if line.strip() and not line.startswith("#")
]

setup(
    name="hedwig",
    version=version,
    description="A fast, minimal, forward-only SMTP relay on gevent",
    long_description=(here / "README.md").read_text(),
    long_description_content_type="text/markdown",
    packages=find_packages(include=["hedwig", "hedwig.*"]),
    python_requires=">=3.11",
    install_requires=requires,
    extras_require={"redis": ["redis>=5"]},  # [server.rate_limits] backend = "redis"
    entry_points={"console_scripts": ["hedwig = hedwig.__main__:main"]},
    scripts=[],
    classifiers=[
        "Programming Language :: Python :: 3",
        "Topic :: Communications :: Email :: Mail Transport Agents",
    ],
)
