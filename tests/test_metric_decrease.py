"""A registration whose metric ends a rounding error below its start (refining a converged result)
is not reported as having decreased; a real fall is."""

from regkl.optimize import LevelReport, Result, decreased


def test_rounding_is_not_a_decrease_but_a_fall_is():
    assert not decreased(0.8911240465059984, 0.8911240400690374)   # refine of a converged result
    assert decreased(0.053, 0.048)                                  # the auto-mask wreck of issue 11
    assert not decreased(0.048, 0.053)
    assert decreased(-0.5, -0.6) and not decreased(-0.6, -0.5)      # metrics may be negative (ls, nc)
    level = LevelReport(stage="rigid", spacing_mm=3.0, n_points=10, iterations=1, evaluations=1,
                        metric_start=0.0, metric_end=0.8911240400690374, stop_reason="", seconds=0.0,
                        metric_initial=0.8911240465059984)
    assert not level.metric_decreased
    import numpy as np

    result = Result(fixed2moving=np.eye(4), init_fixed2moving=np.eye(4), model="rigid", params=np.zeros(6),
                    centre=np.zeros(3), metric="mi", metric_before=0.053, metric_after=0.048, levels=(level,),
                    seconds=0.0, init="com")
    assert result.metric_decreased
