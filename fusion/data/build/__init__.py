"""`fusion-data`: build WebDataset shards, verify them, summarise them.

    fusion-data text   --input docs.jsonl  --output data/text  --samples-per-shard 1000 --workers 4
    fusion-data images --input pairs.jsonl --output data/image --max-side 512 --format jpg
    fusion-data videos --input clips.csv   --output data/video --fps 8 --max-side 256
    fusion-data vqa    --input qa.jsonl    --output data/vqa
    fusion-data toy    --output data/toy
    fusion-data tokenizer --input data/image data/vqa --output data/tokenizer.json
    fusion-data verify data/text
    fusion-data stats data/text --json

The modules, in the order a build goes through them:

    cli.py       the parser: the table of subcommands, their flags, main
    flags.py     the flags the builders share (input, output, columns, sharding, media) and their types
    readers.py   input records from .jsonl / .txt / .csv / .parquet, one-line errors naming file and line
    makers.py    one record -> one shard sample, per kind of shard: text, image, video, vqa
    writer.py    records -> keys -> shards written by worker processes; resume; whose output
                 directory it is (--overwrite); index.json; the summary line
    report.py    the read-only commands, verify and stats

Adding a builder: a sample maker `make_sample(key, fields, meta) -> {ext: bytes | str | dict}` in
makers.py that raises `SampleError(reason)` for a bad record, a `configure(parser)` that calls
`add_build_arguments` (flags.py) and a `run(args)` that calls `run_build(args, modality, make_sample,
columns)` in cli.py, and a `Command` in its `COMMANDS` table. `make_sample` is pickled to worker
processes: a module-level function, or a `functools.partial` of one.
"""

from fusion.data.build.cli import main

__all__ = ["main"]
