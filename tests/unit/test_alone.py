"""After an unclean stop the jobs taken back run one at a time, each alone in flight; output names are found in
linear time; every image on the way to a cover crop counts against max_output_pixels.

The runner's feeder is stepped here by hand (its threads are not started) over the in-memory store.
"""

from __future__ import annotations

from dataclasses import replace
from pathlib import PurePosixPath

import numpy as np
import pytest

from daemon import pipeline
from daemon.errors import ImageTooLargeError
from daemon.fsops import Root
from daemon.imageio import Decoded, Frame, Metadata
from daemon.jobs import worker_id
from daemon.worker import Runner
from tests.unit.test_worker import Rig


def _runner(rig: Rig) -> Runner:
    return Runner(rig.stages, ["cpu"], 2, lambda _name: worker_id(), clock=lambda: 0.0)


def test_jobs_taken_back_are_fed_one_at_a_time_alone_then_the_pipeline_overlaps_again(tmp_path):
    rig = Rig(tmp_path)
    for i in range(5):
        rig.admit(rig.drop(f"f{i}.png", seed=i))
    first = rig.store.claim("dead-worker", node="n", limit=3)  # a worker claims three, then dies
    assert [j.id for j in first] == [1, 2, 3]
    rig.store.recover(own_node="n", max_recoveries=2)
    runner = _runner(rig)
    fed: list[list[int]] = []
    while True:
        before = set(runner._inflight)
        runner._feed()
        new = sorted(set(runner._inflight) - before)
        if not new and not runner._inflight:
            break
        if new:
            fed.append(new)
        # The stages past the feeder, done by hand: each task in flight ends.
        for q in runner._infer_q.values():
            while not q.empty():
                runner._done(q.get_nowait())
        while not runner._settle_q.empty():
            runner._done(runner._settle_q.get_nowait())
    assert fed[:3] == [[1], [2], [3]], f"the jobs taken back were not fed alone: {fed}"
    assert fed[3:] == [[4, 5]], f"after them the pipeline should take a batch again: {fed}"
    assert all(rig.store.get(i).alone for i in (1, 2, 3)) and not rig.store.get(4).alone


@pytest.mark.timeout(30)  # a runner that feeds beside the job alone hangs here: fail in 30 s, not at 300 s
def test_nothing_is_fed_beside_a_job_that_runs_alone(tmp_path):
    rig = Rig(tmp_path)
    for i in range(3):
        rig.admit(rig.drop(f"f{i}.png", seed=i))
    rig.store.claim("dead-worker", node="n", limit=1)
    rig.store.recover(own_node="n", max_recoveries=2)
    runner = _runner(rig)
    runner._feed()
    assert runner._inflight == {1}
    for _ in range(3):
        runner._feed()  # while it runs, the feeder waits
    assert runner._inflight == {1}, "a job was fed beside the one that must run alone"


@pytest.mark.timeout(30)
def test_a_job_taken_back_waits_for_the_jobs_already_in_flight(tmp_path):
    """A job taken back while others are in flight (a worker died, its jobs came back) must not join them: the
    feeder lets the pipeline drain, and only then runs it alone."""
    rig = Rig(tmp_path)
    for i in range(2):
        rig.admit(rig.drop(f"f{i}.png", seed=i))
    runner = _runner(rig)
    runner._feed()
    running = [q.get_nowait() for q in runner._infer_q.values() for _ in range(q.qsize())]  # in the model now
    assert runner._inflight == {1, 2} and len(running) == 2
    rig.admit(rig.drop("g.png", seed=9))
    rig.store.claim("dead-worker", node="n", limit=1)  # job 3: another worker claims it, then dies
    rig.store.recover(own_node="n", max_recoveries=2, spare=lambda job: job.worker != "dead-worker")
    assert rig.store.suspects() == 1
    runner.suspects_maybe()
    runner._feed()
    assert runner._inflight == {1, 2}, "a job taken back was fed beside jobs already in flight"
    for task in running:  # the two end
        runner._done(task)
    runner._feed()
    assert runner._inflight == {3} and rig.store.get(3).alone, "the job taken back did not run once they ended"


class CountingRoot(Root):
    """The real outbox handle, counting how often a name is looked up."""

    probes = 0

    def exists(self, rel):  # noqa: ANN001, ANN201 - Root.exists
        CountingRoot.probes += 1
        return super().exists(rel)


def test_inputs_that_share_an_output_name_cost_linear_probes(tmp_path):
    """800 files named a.<N> all want a.nearest.x2.png: each took a walk from -1 upwards (30 s for 800). The last
    suffix given to a name is remembered."""
    rig = Rig(tmp_path)
    rig.stages.outbox = CountingRoot(rig.settings.outbox)
    n = 300
    for i in range(n):
        rig.admit(rig.drop(f"a.{i}.png", seed=i))
    taken: set[str] = set()
    CountingRoot.probes = 0
    for job in [rig.store.get(i + 1) for i in range(n)]:
        forced = replace(job, rel=PurePosixPath("a.png"))  # one output name for all of them
        path = rig.stages.plan_output(forced, lambda p: p in taken)
        assert path not in taken
        taken.add(path)
    assert len(taken) == n
    assert CountingRoot.probes < 3 * n, f"{CountingRoot.probes} name lookups for {n} outputs of one name"


def test_every_image_on_the_way_to_a_cover_crop_counts_against_max_output_pixels(tmp_path):
    """Finding 4: a 1x10000 input under a 128x128 cover rule built a 128x1,280,000 image to crop 128x128 from it
    (4.7 GB). The image before the crop counts."""
    cover = {"folder": "", "model": "bicubic", "width": 128, "height": 128, "fit": "cover"}
    rig = Rig(tmp_path, rules=[cover], max_output_pixels=100_000_000)
    rule = rig.settings.rules[0]
    tall = Decoded(first=Frame(np.zeros((10000, 1, 3), np.uint8)), format="png", meta=Metadata(), mode="RGB")
    with pytest.raises(ImageTooLargeError, match=r"on its way to 128x128, the image would be 128x1280000"):
        pipeline.prepare(rule, tall, rig.settings)
    fine = Decoded(first=Frame(np.zeros((300, 200, 3), np.uint8)), format="png", meta=Metadata(), mode="RGB")
    assert pipeline.prepare(rule, fine, rig.settings).size == (128, 128)
