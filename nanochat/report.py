"""
The report card. Each stage writes its own markdown section into $NANOCHAT_BASE_DIR/report/;
assembling them into report.md comes with the end-to-end runs.
"""
import os
import re
from datetime import datetime

from nanochat.common import atomic_write_text, get_base_dir


def get_report_dir():
    path = os.path.join(get_base_dir(), "report")
    os.makedirs(path, exist_ok=True)
    return path


def slugify(title):
    return re.sub(r"[^a-z0-9]+", "-", title.lower()).strip("-")


def write_section(title, body):
    """Write (or replace) one stage's section; returns its path. `body` is markdown."""
    path = os.path.join(get_report_dir(), slugify(title) + ".md")
    stamp = datetime.now().strftime("%Y-%m-%d %H:%M:%S")
    atomic_write_text(path, f"## {title}\n\ntimestamp: {stamp}\n\n{body.rstrip()}\n")
    return path
