#!/usr/bin/env python3
"""Turn text files, directories or jsonl into a Megatron indexed dataset (.bin/.idx).

  python tools/prepare_data.py --input docs/ notes.txt --output-prefix data/mycorpus
  python tools/prepare_data.py --input web.jsonl --json-key text --output-prefix data/web \
      --tokenizer huggingface --tokenizer-name-or-path /models/tok --workers 8

One document per file (directories are walked recursively, sorted, filtered by --pattern) or per
jsonl line; an EOD token follows each document. Byte-level tokenizer by default (vocab 257, EOD
256). Train on the result with data=indexed data.paths=[data/mycorpus].
"""

from __future__ import annotations

import argparse
import sys
import time


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--input", nargs="+", required=True,
                   help="text files, directories of files, or .jsonl files")
    p.add_argument("--output-prefix", required=True,
                   help="writes <prefix>.bin and <prefix>.idx")
    p.add_argument("--json-key", default="text", help="field of each jsonl record holding the text")
    p.add_argument("--input-format", default="auto", choices=["auto", "text", "jsonl"],
                   help="auto: .jsonl/.ndjson are jsonl, everything else is one text document")
    p.add_argument("--pattern", default=None,
                   help="comma-separated file-name globs applied inside directories, e.g. '*.py,*.md'")
    p.add_argument("--tokenizer", default="byte", choices=["byte", "huggingface"])
    p.add_argument("--tokenizer-name-or-path", default=None,
                   help="Hugging Face tokenizer directory, hub name (offline cache) or tokenizer.json")
    p.add_argument("--workers", type=int, default=1, help="tokenizer worker processes")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    return p.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    import warnings

    # Importing megatron.core announces missing TransformerEngine/Apex; irrelevant to data prep.
    warnings.filterwarnings("ignore", message=".*Transformer Engine and Apex.*")
    from msa_train.data.config import DataConfigError, TokenizerConfig
    from msa_train.data.prepare import PrepareDataError, prepare_indexed_dataset

    t0 = time.time()
    try:
        summary = prepare_indexed_dataset(
            args.input, args.output_prefix,
            TokenizerConfig(type=args.tokenizer, name_or_path=args.tokenizer_name_or_path),
            json_key=args.json_key, pattern=args.pattern, input_format=args.input_format,
            workers=args.workers, progress=not args.no_progress)
    except (PrepareDataError, DataConfigError) as err:
        print(f"prepare_data: error: {err}", file=sys.stderr)
        return 2
    print(f"prepare_data: {summary.line()} in {time.time() - t0:.1f}s -> "
          f"{args.output_prefix}.bin/.idx")
    return 0


if __name__ == "__main__":
    sys.exit(main())
