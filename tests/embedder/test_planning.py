from embedder.planning import RunLimits, plan_runs


def _padded(runs, lengths):
    return sum(len(run) * max(lengths[i] for i in run) for run in runs)


def test_every_text_lands_in_exactly_one_run():
    lengths = [7, 3, 120, 9, 9, 40, 3, 64, 11, 250]
    runs = plan_runs(lengths, RunLimits(max_rows=4, max_tokens=512, run_cost_tokens=16))
    assert sorted(i for run in runs for i in run) == list(range(len(lengths)))
    assert all(len(run) <= 4 for run in runs)


def test_runs_stay_within_the_token_budget_but_a_long_text_still_runs_alone():
    lengths = [30] * 10 + [300]
    runs = plan_runs(lengths, RunLimits(max_rows=64, max_tokens=100, run_cost_tokens=1000))
    assert all(len(run) * max(lengths[i] for i in run) <= 100 for run in runs if len(run) > 1)
    assert [10] in runs


def test_grouping_by_length_cuts_padding():
    lengths = [8, 60, 9, 58, 10, 61, 8, 59] * 4
    limits = RunLimits(max_rows=64, max_tokens=8192, run_cost_tokens=32)
    runs = plan_runs(lengths, limits)
    assert len(runs) == 2
    assert _padded(runs, lengths) < 0.6 * len(lengths) * max(lengths)


def test_similar_lengths_share_one_run():
    lengths = [20, 21, 22, 20, 23, 21]
    assert plan_runs(lengths, RunLimits(run_cost_tokens=32)) == [sorted(range(6), key=lengths.__getitem__)]
