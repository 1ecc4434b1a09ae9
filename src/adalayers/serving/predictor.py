"""What the server runs: any subset of a runtime's tasks on texts, and the facts it reports.

The batcher calls :meth:`Predictor.predict` in its model thread; the HTTP app counts tokens
(:meth:`Predictor.count_tokens`), checks the kind of input (:meth:`Predictor.check_pairs`) and
describes the tasks (:meth:`Predictor.describe`, ``GET /tasks``).
"""

from __future__ import annotations

import copy
import threading
from collections.abc import Callable, Sequence
from typing import Any

from adalayers.core.multitask import AdaLayers
from adalayers.core.task import check_pairs


class Predictor:
    """Runs any subset of a runtime's tasks on texts (what the server calls, in a thread).

    Args:
        runtime: the base with its tasks.
        info: extra facts per task for ``GET /tasks`` (e.g. the run folder).
    """

    def __init__(self, runtime: AdaLayers, info: dict[str, dict[str, Any]] | None = None) -> None:
        if not runtime.tasks:
            raise ValueError("the runtime has no tasks to serve")
        self.runtime = runtime.eval()
        self.info = info or {}
        self._subsets: dict[tuple[str, ...], AdaLayers] = {}
        # a copy for counting tokens off the model thread: a fast tokenizer called from two
        # threads with different truncation settings fails ("Already borrowed")
        self._tokenizer = copy.deepcopy(runtime.backbone.tokenizer)
        self._tokenizer_lock = threading.Lock()

    @property
    def task_names(self) -> list[str]:
        return list(self.runtime.tasks)

    def count_tokens(
        self,
        texts: Sequence[str],
        tasks: Sequence[str] | None = None,
        pairs: Sequence[str] | None = None,
    ) -> list[int]:
        """Tokens per text (or pair: both texts) that the base runs for ``tasks`` (default:
        all), special ones included.

        A token task reads all of a text (in windows); a sequence task only the base's maximum.
        """
        names = [n for n in self.task_names if tasks is None or n in tasks]
        whole = any(self.runtime.tasks[n].kind.per_token for n in names)
        second = list(pairs) if pairs is not None else None
        with self._tokenizer_lock:
            ids = self._tokenizer(list(texts), second, verbose=False)["input_ids"]
        cap = None if whole else self.runtime.max_length
        return [len(row) if cap is None else min(len(row), cap) for row in ids]

    def check_pairs(self, tasks: Sequence[str] | None, pairs: bool) -> None:
        """Raise :class:`~adalayers.core.task.PairMismatchError` if ``tasks`` (default: all) do not
        all take this kind of input (sentence pairs, or single texts)."""
        names = [n for n in self.task_names if tasks is None or n in tasks]
        check_pairs({n: self.runtime.tasks[n] for n in names}, pairs)

    def predict(
        self,
        texts: list[str],
        tasks: Sequence[str] | None = None,
        batch_size: int = 32,
        before_forward: Callable[[], None] | None = None,
        pairs: list[str] | None = None,
    ) -> list[dict[str, Any]]:
        """Predictions of ``tasks`` (default: all) for ``texts`` (and the second texts
        ``pairs`` of sentence pairs), one base forward per batch.

        ``before_forward`` is called before each forward; what it raises stops the work.
        """
        names = tuple(n for n in self.task_names if tasks is None or n in tasks)
        if names not in self._subsets:
            if len(names) == len(self.task_names):
                self._subsets[names] = self.runtime
            else:
                subset = AdaLayers(self.runtime.backbone)
                for name in names:
                    subset.add_task(name, self.runtime.tasks[name])
                self._subsets[names] = subset.eval()
        return self._subsets[names].predict(
            texts, pairs, batch_size=batch_size, before_forward=before_forward
        )

    def describe(self) -> dict[str, Any]:
        backbone = self.runtime.backbone
        tasks = {}
        for name, task in self.runtime.tasks.items():
            tasks[name] = {
                "task_type": task.task_type,
                "labels": task.labels,
                "text_pair": task.text_pair if task.kind.reads_pairs else False,
                "base": task.base.name_or_path,
                "layer_weights": {str(k): v for k, v in task.mixer.layer_weights().items()},
                "parameters": task.num_parameters(),
                **self.info.get(name, {}),
            }
        return {
            "base": {
                "name_or_path": backbone.name_or_path,
                "family": backbone.family,
                "states": backbone.states,
                "num_states": backbone.num_states,
                "hidden_size": backbone.hidden_size,
                "fingerprint": backbone.fingerprint(),
            },
            "tasks": tasks,
        }
