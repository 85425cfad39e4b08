"""
Fetch the evaluation data the tasks read, for machines without the shared data folder.

    python -m tasks.download                      # everything, into $NANOCHAT_DATA_DIR (or ../shared/data)
    python -m tasks.download --only=gsm8k,arc --dest=~/nanochat-data
    NANOCHAT_EVAL_URL=https://my.mirror/data python -m tasks.download

By default each file comes from its public source (raw GitHub URLs at pinned commits, see
../shared/data/SOURCES.md). With NANOCHAT_EVAL_URL (or --base-url) set, every file is fetched from
BASE/<path relative to the data folder> instead, i.e. a mirror with the layout of the data folder.
Existing files are kept unless --force. The transfer itself is nanochat.download.download_file.
"""
import os
import sys

from nanochat.common import logger, make_parser, read_jsonl, str2bool
from nanochat.download import DownloadError, download_file  # noqa: F401  (re-exported)
from tasks.common import get_task_data_dir
from tasks.mmlu import SUBJECTS, read_mmlu_csv

EVAL_URL_ENV = "NANOCHAT_EVAL_URL"


# -----------------------------------------------------------------------------
# Validation hooks for the task formats: fail fast on an HTML error page or a truncated file.

def validate_jsonl(path):
    if not read_jsonl(path):  # raises on a line that is not JSON
        raise ValueError("no rows")


def validate_mmlu_csv(path):
    if not read_mmlu_csv(path, subject=None):  # raises on a row that is not a question, 4 choices and an answer
        raise ValueError("no rows")

# -----------------------------------------------------------------------------
# What to download: path under the data folder -> default public source

def _github(repo, commit, path):
    return f"https://raw.githubusercontent.com/{repo}/{commit}/{path}"


def eval_files():
    """{group: {relative path under the data folder: default url}}."""
    gsm = ("openai/grade-school-math", "3101c7d5072418e28b9008a6636bde82a006892c")
    humaneval = ("openai/human-eval", "6d43fb980f9fee3c892a914eda09951f772ad10d")
    mmlu = ("HaeChan0305/MLILAB-FedLLM", "d92730e8bacd7b3a61e551e015e40588e10234b4")
    foundry = ("mosaicml/llm-foundry", "8c8dd48f72168c5d51e2f7b151595892a8fba43d")
    return {
        "gsm8k": {f"eval/gsm8k/{s}.jsonl": _github(*gsm, f"grade_school_math/data/{s}.jsonl")
                  for s in ("train", "test", "test_socratic")},
        "humaneval": {"eval/humaneval/HumanEval.jsonl.gz": _github(*humaneval, "data/HumanEval.jsonl.gz")},
        "mmlu": {f"eval/mmlu/{split}/{subj}_{split}.csv": _github(*mmlu, f"data/mmlu/{split}/{subj}_{split}.csv")
                 for split in ("dev", "test") for subj in SUBJECTS},
        "arc": {f"eval/core/eval_data/world_knowledge/{name}.jsonl":
                _github(*foundry, f"scripts/eval/local_data/world_knowledge/{name}.jsonl")
                for name in ("arc_easy", "arc_challenge")},
    }


def download_eval_data(dest_dir, groups, base_url=None, force=False):
    """Download the task files of `groups` under `dest_dir`, from `base_url` (a mirror with the data folder's
    layout) or else their public sources; returns the paths written."""
    files = eval_files()
    unknown = [g for g in groups if g not in files]
    if unknown:
        raise ValueError(f"unknown data group(s) {unknown}; choose from {sorted(files)}")
    written = []
    for group in groups:
        for rel, default_url in files[group].items():
            dest = os.path.join(dest_dir, rel)
            if os.path.exists(dest) and not force:
                continue
            url = f"{base_url.rstrip('/')}/{rel}" if base_url else default_url
            check = validate_mmlu_csv if rel.endswith(".csv") else validate_jsonl
            logger.info(f"downloading {url} -> {dest}")
            written.append(download_file(url, dest, validate=check))
    return written


def main(argv=None):
    parser = make_parser(__doc__)
    parser.add_argument("--dest", default=get_task_data_dir(), help="data folder to fill (the tasks read NANOCHAT_DATA_DIR)")
    parser.add_argument("--only", default=",".join(eval_files()), help="comma-separated groups to fetch")
    parser.add_argument("--base-url", default=os.environ.get(EVAL_URL_ENV) or "",
                        help=f"mirror with the data folder's layout (env {EVAL_URL_ENV}); empty = public sources")
    parser.add_argument("--force", type=str2bool, default=False, help="download files that already exist again")
    args = parser.parse_args(argv)
    groups = [g.strip() for g in args.only.split(",") if g.strip()]
    try:
        written = download_eval_data(os.path.expanduser(args.dest), groups, args.base_url, args.force)
    except (ValueError, DownloadError) as e:
        parser.exit(1, f"error: {e}\n")
    print(f"{len(written)} file(s) downloaded into {args.dest}")
    if os.path.abspath(os.path.expanduser(args.dest)) != os.path.abspath(get_task_data_dir()):
        print(f"point the tasks at it with: export NANOCHAT_DATA_DIR={args.dest}")


if __name__ == "__main__":
    main(sys.argv[1:])
