"""augment.py's output: the JSONL rows, appended as whole lines and flushed one at a time, and next to them
``<stem>.provenance.json`` (settings, models, counts, versions, commit of every invocation) and, when new
prompts were written, ``<stem>.new_prompts.jsonl``. A file made with the same settings is resumed (its
prompts are skipped; a torn last line left by a crash is cut off first); one made with other settings is
refused, naming the differences, unless ``--overwrite``."""

from __future__ import annotations

import json
import os
import time

from benchmarks.stamp import run_stamp
from training.checkpoint import atomic_write, differences
from training.data import DataError
from training.options import UsageError
from training.prompts import prompt_key


class Output:
    def __init__(self, path: str, settings: dict, *, overwrite: bool, log=print):
        self.path, self.settings, self.log = path, json.loads(json.dumps(settings)), log
        stem = path[: -len(".jsonl")] if path.endswith(".jsonl") else path
        self.provenance_path, self.new_prompts_path = stem + ".provenance.json", stem + ".new_prompts.jsonl"
        os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
        if overwrite:
            for p in (self.path, self.provenance_path, self.new_prompts_path):
                if os.path.exists(p):
                    os.remove(p)
        self.provenance = self._check_provenance()
        self.done = self._read_rows()  # prompt keys already written
        self.file = None

    def _check_provenance(self) -> dict:
        if not os.path.exists(self.provenance_path):
            if os.path.exists(self.path):
                raise UsageError(f"--output {self.path} exists without {self.provenance_path} (rows of unknown "
                                 "origin); pass --overwrite to replace it, or choose another --output")
            return {"settings": self.settings, "runs": []}
        try:
            with open(self.provenance_path) as f:
                prov = json.load(f)
            old = prov["settings"]
        except (OSError, ValueError, KeyError, TypeError) as e:
            raise UsageError(f"{self.provenance_path} cannot be read ({type(e).__name__}: {e}); "
                             "pass --overwrite") from None
        diff = differences(old, self.settings)
        if diff:
            raise UsageError(f"--output {self.path} was made with other settings ({'; '.join(diff)}); pass --overwrite "
                             "to replace it, or choose another --output")
        return prov

    def _read_rows(self) -> set:
        if not os.path.exists(self.path):
            return set()
        with open(self.path, "rb") as f:
            data = f.read()
        end = data.rfind(b"\n") + 1
        if end < len(data):  # a crash mid-write: the only line that can be incomplete is the last
            self.log(f"{self.path}: cut off a torn last line ({len(data) - end} bytes) before resuming")
            with open(self.path, "r+b") as f:
                f.truncate(end)
        done = set()
        for n, line in enumerate(data[:end].decode("utf-8").split("\n"), 1):
            if line.strip():
                try:
                    done.add(prompt_key(json.loads(line)["prompt"]))
                except (ValueError, KeyError, TypeError) as e:
                    raise DataError(f"{self.path} line {n}: not a row this tool wrote ({type(e).__name__}: {e}); "
                                    "pass --overwrite to start again") from None
        if done:
            self.log(f"{self.path}: resuming, {len(done)} prompts already written")
        return done

    def load_new_prompts(self) -> list | None:
        if not os.path.exists(self.new_prompts_path):
            return None
        with open(self.new_prompts_path) as f:
            return [json.loads(line) for line in f if line.strip()]

    def save_new_prompts(self, prompts: list) -> None:
        atomic_write(self.new_prompts_path, "".join(json.dumps(p, ensure_ascii=False) + "\n" for p in prompts))

    def start(self, models: dict) -> None:
        """Record this invocation (marked unfinished until ``finish``) and open the file for appending."""
        self.run = {"started": time.strftime("%Y-%m-%d %H:%M:%S %Z"), "models": models, "finished": None,
                    "stamp": run_stamp()}
        self.provenance["runs"].append(self.run)
        self._write_provenance(complete=False)
        self.file = open(self.path, "a", encoding="utf-8")

    def append(self, row: dict) -> None:
        self.file.write(json.dumps(row, ensure_ascii=False) + "\n")  # one write per line, then flushed
        self.file.flush()
        self.done.add(prompt_key(row["prompt"]))

    def finish(self, counts: dict) -> None:
        self.file.close()
        self.run.update(finished=time.strftime("%Y-%m-%d %H:%M:%S %Z"), counts=dict(sorted(counts.items())))
        self._write_provenance(complete=True)

    def _write_provenance(self, complete: bool) -> None:
        self.provenance.update(complete=complete, rows_in_file=len(self.done), output=os.path.abspath(self.path))
        atomic_write(self.provenance_path, json.dumps(self.provenance, indent=1))
