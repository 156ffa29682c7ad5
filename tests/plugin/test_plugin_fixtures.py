"""Hand-written tests with the plugin's fixtures, under real pytest runs (pytester)."""

from __future__ import annotations

import pytest

pytest_plugins = ["pytester"]


@pytest.fixture
def project(pytester: pytest.Pytester, probe_heads):
    pytester.makefile(".toml",
                      pyproject='[tool.pytest.ini_options]\nneuronpatch_figures = "none"\n')
    pytester.makeconftest(
        f"""
        import pytest

        @pytest.fixture
        def causal():
            return {str(probe_heads.causal)!r}

        @pytest.fixture
        def oracle_slope():
            return {probe_heads.causal_slope!r}
        """
    )
    return pytester


def test_runner_runs_experiments_and_plain_asserts_work(project):
    project.makepyfile(
        """
        import pytest

        def test_tracks(neuronpatch_runner, causal, oracle_slope):
            res = neuronpatch_runner.run(causal, inputs=["The cat sat.", "A dog ran."],
                                         set=[-1, 0, 1, 2])
            assert res.slope == pytest.approx(oracle_slope, abs=1e-5)
            assert res.metrics()["r_squared"] == pytest.approx(1.0, abs=1e-6)

        def test_heads_are_loaded_once_per_session(neuronpatch_runner, causal):
            assert neuronpatch_runner.load_head(causal) is neuronpatch_runner.load_head(causal)

        def test_same_runner_all_session(neuronpatch_runner, request):
            from neuronpatch.pytest_plugin.runner import get_runner
            assert neuronpatch_runner is get_runner(request.config)
        """
    )
    project.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=3)


def test_neuronpatch_expect_fails_like_a_probe_with_the_calling_line(project):
    path = project.makepyfile(
        test_claims="""
        def test_passes(neuronpatch_runner, neuronpatch_expect, causal, oracle_slope):
            res = neuronpatch_runner.run(causal, inputs=["The cat sat."], set=[0, 1, 2])
            outcomes = neuronpatch_expect(res, slope={"approx": oracle_slope, "abs": 1e-4},
                                          r_squared={"min": 0.99})
            assert [o.passed for o in outcomes] == [True, True]

        def test_fails(neuronpatch_runner, neuronpatch_expect, causal):
            res = neuronpatch_runner.run(causal, inputs=["The cat sat."], set=[0, 1, 2])
            neuronpatch_expect(res, slope=[100, 200], r_squared={"min": 0.99})
        """
    )
    line = next(i for i, text in enumerate(path.read_text().splitlines(), 1)
                if "slope=[100, 200]" in text)
    result = project.runpytest("-p", "no:cacheprovider", "--neuronpatch-artifacts", "arts")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.re_match_lines([
        r"E +neuronpatch\.pytest_plugin\.report\.ProbeFailed: test 'test_fails' failed: "
        r"1 of 2 expectations not met",
        r"E +FAIL  slope +  = \S+ +expected \[100, 200\] +at .*test_claims\.py:" + str(line),
        r"E +pass  r_squared  = 1 +expected ≥ 0\.99 +at .*test_claims\.py:" + str(line),
        r"E +artifacts: arts/test_claims\.py_test_fails-\w+/",
    ])
    assert "neuronpatch/pytest_plugin" not in result.stdout.str()  # __tracebackhide__
    assert (project.path / "arts").is_dir()


def test_plain_expect_and_assert_in_range_in_a_test(project):
    project.makepyfile(
        """
        from neuronpatch.probes import assert_in_range, expect

        def test_claims(neuronpatch_runner, causal):
            res = neuronpatch_runner.run(causal, inputs=["The cat sat.", "A dog."], set=[0, 1, 2])
            expect(res, r_squared={"min": 0.99}, per_input_r2={"min": 0.99})
            assert_in_range(res.slope, {"abs_min": 1e-3}, name="slope")

        def test_claim_fails(neuronpatch_runner, causal):
            res = neuronpatch_runner.run(causal, inputs=["The cat sat.", "A dog."], set=[0, 2])
            expect(res, per_input_slope={"min": 100})
        """
    )
    result = project.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(passed=1, failed=1)
    result.stdout.re_match_lines([
        r"E +FAIL  per_input_slope  = 2 of 2 inputs out of range  expected ≥ 100  at .*",
        r"E +inputs\[0\] 'The cat sat\.' = .*",
    ])


def test_engine_errors_in_a_test_are_one_line(project, probe_heads):
    project.makepyfile(
        f"""
        def test_bad(neuronpatch_runner):
            neuronpatch_runner.run({str(probe_heads.heads / "nope")!r}, set=[0, 1])
        """
    )
    result = project.runpytest("-p", "no:cacheprovider")
    result.assert_outcomes(failed=1)
    result.stdout.fnmatch_lines(["E *HeadConfigError: */nope: head directory not found"])


def test_models_are_loaded_once_per_session(project, probe_heads):
    # Probes and hand-written tests share one runner and the engine's model cache.
    from neuronpatch import models

    models.clear_cache()
    before = models.load_count
    (project.path / "heads").mkdir()
    probe_heads.copy_heads(project.path / "heads")
    (project.path / "one.probe.yaml").write_text(
        "head: heads/*\ninterventions: {set: [0, 1]}\n---\nname: again\nhead: heads/causal\n"
    )
    project.makepyfile(
        """
        def test_by_hand(neuronpatch_runner, causal):
            neuronpatch_runner.run(causal, inputs=["x y"], set=[0, 1])
        """
    )
    project.runpytest("-p", "no:cacheprovider").assert_outcomes(passed=4)
    assert models.load_count - before == 1


def test_relative_head_paths_resolve_against_the_rootdir_not_the_cwd(project, probe_heads,
                                                                    monkeypatch):
    probe_heads.copy_heads(project.path / "heads")
    tests = project.mkdir("tests")
    (tests / "test_rel.py").write_text(
        "def test_rel(neuronpatch_runner, neuronpatch_expect):\n"
        "    res = neuronpatch_runner.run('heads/causal', inputs=['a b c'], set=[0, 1, 2])\n"
        "    neuronpatch_expect(res, r_squared={'min': 0.99})\n")
    monkeypatch.chdir(tests)  # `cd tests && pytest`
    result = project.runpytest("-p", "no:cacheprovider", "-rs")
    result.assert_outcomes(passed=1)
    result.stdout.fnmatch_lines(["neuronpatch: 1 test: 1 passed"])
