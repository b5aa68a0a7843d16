"""Evaluation statistics and the run report (no torch, no grpc, no numpy: the coordinator imports it).

Modules: `stats` (the statistics below), `report` (report.json), `markdown` (report.md); import from here.

The coordinator imports this module, so it stays light. It turns what the
evaluate stage measured into the headline numbers of a run and writes them as
`report.json` (`build_report_json`) and a readable `report.md`
(`render_markdown`).

Win rates
---------
`win_rate(scores_a, scores_b)` compares policy A (the final policy) with
policy B (the SFT policy) on the same held-out prompts, as judged by one judge
(the gold scorer, or a second independent judge). Element i of each list is the
judge's score of that policy's response to prompt i: a number, or a list of
numbers when several responses were sampled per prompt. The two lists must
have the same length (one entry per prompt, same order).

* Per prompt, every response of A is compared with every response of B (all
  k_a x k_b pairs; with one response each that is one comparison). A pair is a
  tie when |a - b| <= tie_tolerance, a win for A when a > b otherwise, else a
  loss. The prompt's outcome is the fraction of its pairs won plus half the
  fraction tied, a number in [0, 1]; all-pairs is the U-statistic estimate of
  P(A beats B) for that prompt, with less variance than pairing sample j with
  sample j.
* `wins`, `ties`, `losses` are the per-prompt fractions summed over prompts
  (whole numbers with one response each), so wins + ties + losses == n, the
  number of prompts.
* Ties count as half a win and n is unchanged: rate = (wins + ties / 2) / n,
  the mean prompt outcome.

The interval is over prompts (the unit that was sampled), at `confidence`:

* method="wilson" (default): the Wilson score interval with successes
  wins + ties / 2 out of n. It is closed-form and deterministic, keeps to
  [0, 1], behaves at small n and at rates near 0 or 1 (all wins out of 50 gives
  [0.929, 1], where the Wald interval collapses to [1, 1]) and has close to
  nominal coverage. A prompt outcome is a number in [0, 1] with mean p, whose
  variance is at most p (1 - p), the Bernoulli variance the interval assumes;
  half-counted ties and several samples per prompt only lower the variance,
  so there the interval is conservative (a bit wide), never too narrow.
* method="bootstrap": a percentile bootstrap over prompts: `n_bootstrap`
  resamples of the n prompt outcomes with replacement (a `random.Random(seed)`,
  so the same inputs give the same interval), the interval between the
  (1 - confidence) / 2 and (1 + confidence) / 2 quantiles of the resampled
  means. It uses the outcomes' actual spread, but is Monte-Carlo noisy and
  degenerate when all outcomes are equal (all wins gives [1, 1]), which is why
  it is not the default.

`win_rate_from_preferences` is the same for a judge that states a preference
per prompt (1: A better, 0: B better, 0.5: tie) instead of scoring each
response.

Other statistics
----------------
* `mean_with_ci(values)`: mean with a Student-t interval (sample standard
  deviation, n - 1 degrees of freedom). `t_quantile(p, df)` inverts the
  Student-t CDF (regularized incomplete beta function, bisection); closed forms
  for df = 1 and 2; a Cornish-Fisher expansion around the normal quantile for
  df > 1e4, where it is exact to double precision.
* `wilson_interval(successes, n)`: the interval above, for any proportion
  (e.g. RM accuracy on n held-out comparisons).
* `kl_summary(rows)`: rows of per-token KL(policy || reference) estimates,
  one row per response; mean per token (all tokens pooled) and per sequence
  (mean over responses of the row sums).
* `alignment_tax(loss_before, loss_after)`: the change of the LM loss on
  held-out plain text across PPO (after - before; positive is a tax) and the
  same relative to the loss before.

report.json schema (version 1)
------------------------------
`build_report_json` returns a dict of JSON types only (strings as keys, no
tuples, non-finite numbers written as null), so
`json.loads(json.dumps(report)) == report`. Every key below is always present;
a quantity that was not measured is null (or an empty list/dict)::

    schema_version: 1
    meta: {str: any JSON}                     # run id, models, seeds ... (free-form)
    win_rates: {judge: WinRate}               # policy vs SFT, one entry per judge
      WinRate = {wins, losses, ties, n, rate, lower, upper, method, confidence, comparisons}
    acceptance: {primary_judge, min_rate, min_lower, secondary_min_rate,
                 primary_ok: bool, secondary_ok: {judge: bool}, passed: bool}
    rm_accuracy_per_round: [{round, accuracy, n, lower, upper, breakdown}]   # n/lower/upper null when n unknown
      breakdown: alignd.rm_breakdown.breakdown of the held-out pairs | null (e.g. external labelers)
    labeler_agreement: {agreement, stderr, temperature, pairs} | null
    kl_to_reference: {per_token, per_sequence, sequences, tokens} | null
    reward: {sft: MeanCI | null, final: MeanCI | null}
      MeanCI = {mean, lower, upper, n, std, confidence}           # lower/upper/std null when n == 1
    alignment_tax: {without_ptx: Tax | null, with_ptx: Tax | null}
      Tax = {before, after, absolute, relative}                    # relative null when before == 0
    wall_seconds_per_stage: {stage: seconds}
    figures: {title: relative path}          # images next to the report

`acceptance` checks the win rates against the run's bar: the primary judge's
rate >= min_rate with its lower bound > min_lower, and every other judge's
rate >= secondary_min_rate; `passed` needs the primary judge and at least one
other judge.
"""

from __future__ import annotations

from alignd.evaluation.markdown import PAPER_LABELER_AGREEMENT, PAPER_RM_ACCURACY, plots_markdown, render_markdown
from alignd.evaluation.report import REPORT_KEYS, SCHEMA_VERSION, acceptance, build_report_json
from alignd.evaluation.schema import Report
from alignd.evaluation.stats import (
    METHODS,
    AlignmentTax,
    KLSummary,
    MeanCI,
    WinRate,
    alignment_tax,
    kl_summary,
    mean_with_ci,
    normal_quantile,
    t_cdf,
    t_quantile,
    wilson_interval,
    win_rate,
    win_rate_from_preferences,
)

__all__ = [
    "METHODS",
    "PAPER_LABELER_AGREEMENT",
    "PAPER_RM_ACCURACY",
    "REPORT_KEYS",
    "Report",
    "SCHEMA_VERSION",
    "AlignmentTax",
    "KLSummary",
    "MeanCI",
    "WinRate",
    "acceptance",
    "alignment_tax",
    "build_report_json",
    "kl_summary",
    "mean_with_ci",
    "normal_quantile",
    "plots_markdown",
    "render_markdown",
    "t_cdf",
    "t_quantile",
    "wilson_interval",
    "win_rate",
    "win_rate_from_preferences",
]
