"""
The statistics of an ablation over several seeds (scripts/ablate.py; docs/ablation.md): mean and spread over
seeds, whether a variant's difference from the reference is beyond seed noise, and the compute multiplier read
off the reference's own validation curve. Plain Python (math only), so the rules are exact and unit-tested; the figure needs matplotlib (optional).

Seed noise rule: a paired two-sided t-test on the per-seed differences variant - reference (run k of every
variant uses the same seed, so the same data order: a seed that is lucky for the reference is lucky for the
variant too, and pairing removes that shared part of the noise); a difference is "beyond seed noise" when
p < NOISE_P. Welch's unpaired test (welch_test) is kept for comparison. With 3 seeds the tests have little power:
a difference they do not flag is "not resolved at this seed count", not "no effect".

Compute multiplier of a variant: F_ref(b) / F_variant, where b is the variant's final (mean over seeds) bpb,
F_variant the training FLOPs it spent, and F_ref(b) the training FLOPs at which the reference's mean validation
curve last reaches b. The curve is piecewise linear in (log FLOPs, log bpb); beyond its ends it is extended by
the least-squares line through its last (or first) few points, and the result is marked "extrapolated".
"""
import math

NOISE_P = 0.05  # the significance level of the seed-noise rule
FIT_POINTS = 3  # points of the curve's end that its log-log extension is fitted to


def mean_std(values):
    """(mean, sample standard deviation with n - 1 in the denominator; 0.0 for a single value)."""
    values = [float(v) for v in values]
    if not values:
        raise ValueError("mean_std needs at least one value")
    n = len(values)
    mean = sum(values) / n
    var = sum((v - mean) ** 2 for v in values) / (n - 1) if n > 1 else 0.0
    return mean, math.sqrt(var)


def _beta_continued_fraction(a, b, x):
    """The continued fraction of the regularized incomplete beta function, evaluated by the modified Lentz
    method; converges fast for x < (a + 1) / (a + b + 2)."""
    tiny = 1e-300

    def guard(v):
        return v if abs(v) > tiny else tiny
    c, d = 1.0, 1.0 / guard(1.0 - (a + b) * x / (a + 1.0))
    h = d
    for m in range(1, 1000):
        # the coefficients d_2m and d_2m+1 of the fraction, each followed by the same Lentz update
        even = m * (b - m) * x / ((a + 2 * m - 1) * (a + 2 * m))
        odd = -(a + m) * (a + b + m) * x / ((a + 2 * m) * (a + 2 * m + 1))
        for num in (even, odd):
            d = 1.0 / guard(1.0 + num * d)
            c = guard(1.0 + num / c)
            delta = d * c
            h *= delta
        if abs(delta - 1.0) < 1e-15:
            break
    return h


def regularized_beta(a, b, x):
    """I_x(a, b), the regularized incomplete beta function, for a, b > 0 and 0 <= x <= 1."""
    if x <= 0.0:
        return 0.0
    if x >= 1.0:
        return 1.0
    # front factor x^a (1 - x)^b / B(a, b), in logs
    log_front = math.lgamma(a + b) - math.lgamma(a) - math.lgamma(b) + a * math.log(x) + b * math.log1p(-x)
    if x < (a + 1.0) / (a + b + 2.0):
        return math.exp(log_front) * _beta_continued_fraction(a, b, x) / a
    return 1.0 - math.exp(log_front) * _beta_continued_fraction(b, a, 1.0 - x) / b  # I_x(a,b) = 1 - I_1-x(b,a)


def t_two_sided_p(t, df):
    """P(|T| >= |t|) for Student's t with `df` (> 0, not necessarily whole) degrees of freedom:
    I_{df / (df + t^2)}(df / 2, 1 / 2)."""
    if not df > 0:
        raise ValueError(f"degrees of freedom must be positive, got {df!r}")
    if math.isinf(t):
        return 0.0
    return regularized_beta(df / 2.0, 0.5, df / (df + t * t))


def t_critical(df, p=NOISE_P):
    """The t with t_two_sided_p(t, df) = p (bisection; 1e-12 relative): the half-width of a (1 - p) confidence
    interval in standard errors (df 2: 4.303, df 4: 2.776 at p = 0.05)."""
    lo, hi = 0.0, 1.0
    while t_two_sided_p(hi, df) > p:
        hi *= 2.0
    while hi - lo > 1e-12 * hi:
        mid = (lo + hi) / 2.0
        lo, hi = (mid, hi) if t_two_sided_p(mid, df) > p else (lo, mid)
    return (lo + hi) / 2.0


def welch_test(reference, variant):
    """Welch's t-test of mean(variant) - mean(reference) over per-seed values (each side >= 2 values):
    {"diff", "se", "t", "df", "p", "beyond_noise"}. se = sqrt(s_r^2 / n_r + s_v^2 / n_v); df by
    Welch-Satterthwaite. When both sides have no spread, any nonzero difference has p = 0."""
    if len(reference) < 2 or len(variant) < 2:
        raise ValueError(f"the seed-noise test needs >= 2 seeds per side, got {len(reference)} and {len(variant)}")
    (m_r, s_r), (m_v, s_v) = mean_std(reference), mean_std(variant)
    v_r, v_v = s_r ** 2 / len(reference), s_v ** 2 / len(variant)
    diff, se = m_v - m_r, math.sqrt(v_r + v_v)
    if se == 0.0:
        t, df, p = (0.0 if diff == 0 else math.copysign(math.inf, diff)), float("nan"), (1.0 if diff == 0 else 0.0)
    else:
        t = diff / se
        # Welch-Satterthwaite: (v_r + v_v)^2 / (v_r^2 / (n_r - 1) + v_v^2 / (n_v - 1))
        df = (v_r + v_v) ** 2 / (v_r ** 2 / (len(reference) - 1) + v_v ** 2 / (len(variant) - 1))
        p = t_two_sided_p(t, df)
    return {"diff": diff, "se": se, "t": t, "df": df, "p": p, "beyond_noise": p < NOISE_P}


def paired_test(reference, variant):
    """Paired t-test of variant[k] - reference[k] (runs k share a seed; >= 2 pairs): {"diff" (mean difference),
    "diff_std" (their sample std), "se" = diff_std / sqrt(n), "t", "df" = n - 1, "p", "ci" (half-width of the
    (1 - NOISE_P) confidence interval of diff: t_critical(df) x se; beyond noise exactly when it excludes 0),
    "beyond_noise"}. When every pair differs by the same amount, any nonzero difference has p = 0."""
    if len(reference) != len(variant) or len(reference) < 2:
        raise ValueError(f"the paired test needs >= 2 pairs of runs, got {len(reference)} and {len(variant)} runs")
    n = len(reference)
    diff, diff_std = mean_std([v - r for r, v in zip(reference, variant)])
    se = diff_std / math.sqrt(n)
    t = diff / se if se else (0.0 if diff == 0 else math.copysign(math.inf, diff))  # no spread: p is 1 or 0
    p = t_two_sided_p(t, n - 1)
    return {"diff": diff, "diff_std": diff_std, "se": se, "t": t, "df": n - 1, "p": p, "ci": t_critical(n - 1) * se,
            "beyond_noise": p < NOISE_P}


def mean_curve(curves):
    """The pointwise mean of several seeds' curves [(flops, bpb), ...] evaluated at the same FLOPs."""
    if not curves or not curves[0]:
        raise ValueError("mean_curve needs at least one non-empty curve")
    xs = [x for x, _ in curves[0]]
    if any([x for x, _ in c] != xs for c in curves[1:]):
        raise ValueError("the seeds' curves were evaluated at different FLOPs; they cannot be averaged")
    return [(x, sum(c[i][1] for c in curves) / len(curves)) for i, x in enumerate(xs)]


def _fit_line(points):
    """(slope, intercept) of the least-squares line through [(x, y)]."""
    n = len(points)
    mx, my = sum(x for x, _ in points) / n, sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx
    return slope, my - slope * mx


def flops_to_reach(curve, target, fit_points=FIT_POINTS):
    """(FLOPs, how) at which `curve` [(flops, bpb)] (FLOPs increasing; points at 0 FLOPs are ignored) last has
    bpb `target`, linear in (log FLOPs, log bpb) between points: how = "interpolated". A target below the curve's
    final value (or above every point) is reached on the least-squares line through the last (first) `fit_points`
    points: how = "extrapolated"; (inf, "not reached") when that line does not descend."""
    pts = [(math.log(f), math.log(b)) for f, b in curve if f > 0]
    if len(pts) < 2:
        raise ValueError("the reference curve needs >= 2 evaluations after step 0 (lower --eval-every)")
    if any(x1 <= x0 for (x0, _), (x1, _) in zip(pts, pts[1:])):
        raise ValueError("the reference curve's FLOPs must increase")
    y = math.log(target)
    if y == pts[-1][1]:  # the curve's own final value: its final FLOPs, exactly
        return float(curve[-1][0]), "interpolated"
    if y > pts[-1][1]:  # the last segment that holds the target, walking back from the end
        for (x0, y0), (x1, y1) in reversed(list(zip(pts, pts[1:]))):
            if min(y0, y1) <= y <= max(y0, y1):
                return math.exp(x1 if y0 == y1 else x0 + (y - y0) * (x1 - x0) / (y1 - y0)), "interpolated"
        end = pts[:fit_points]  # worse than the curve's first evaluation: extend its start
    else:
        end = pts[-fit_points:]
    slope, intercept = _fit_line(end)
    if slope >= 0:
        return math.inf, "not reached"
    return math.exp((y - intercept) / slope), "extrapolated"


def compute_multiplier(reference_curve, target, flops_spent):
    """(multiplier, how): the reference FLOPs that reach bpb `target` (flops_to_reach) / `flops_spent`."""
    flops, how = flops_to_reach(reference_curve, target)
    return flops / flops_spent, how


def loss_rise(losses):
    """The largest rise of a training loss above its running minimum (its lowest value so far), in the loss's
    units; inf once a loss is not finite. The ablation's stability figure: minibatch noise gives every run some
    rise (the reference's is the baseline to read a variant's against); a loss spike or a divergence gives more."""
    low, worst = math.inf, 0.0
    for x in losses:
        if not math.isfinite(x):
            return math.inf
        worst, low = max(worst, x - low), min(low, x)
    return worst


def plot_ablation(rows, path):
    """Draw scripts/ablate.py's summary rows to `path`; returns the path, or None without matplotlib.
    Left: mean validation bpb against training FLOPs (log scale) per variant. Right: each variant's paired
    difference from the reference (text and conversation bpb) with its 95% confidence interval, filled when beyond
    seed noise (the interval excludes 0)."""
    try:
        from matplotlib import colormaps
        from matplotlib.figure import Figure  # the object API draws with Agg and touches no global state
    except ImportError:
        return None
    fig = Figure(figsize=(15, 0.3 * len(rows) + 5), layout="constrained")
    curves, diffs = fig.subplots(1, 2, width_ratios=(3, 2))
    palette = colormaps["tab20"]
    colors = [palette(j) for j in (*range(0, 20, 2), *range(1, 20, 2))]  # the strong shades first
    for i, r in enumerate(rows):
        pts = [(f, b) for f, b in r["curve"] if f > 0]
        ref = r["label"] == "reference"
        curves.plot([f for f, _ in pts], [b for _, b in pts], marker="." if not ref else "o", ms=3 if not ref else 4,
                    lw=2.2 if ref else 1.0, color="k" if ref else colors[i % 20], label=r["label"], zorder=3 if ref else 2)
    curves.set(xscale="log", xlabel="training FLOPs",
               ylabel="validation bpb on held-out text (mean over seeds; lower is better)")
    curves.legend(fontsize=8)
    curves.grid(True, which="both", alpha=0.3)
    others = [r for r in rows if r["label"] != "reference"]
    spread = 0.3 if any(r.get("chat_bpb") for r in others) else 0.0  # two markers per variant: side by side
    for k, (metric, marker, color, name) in enumerate((("text_bpb", "o", "tab:blue", "text bpb"),
                                                       ("chat_bpb", "s", "tab:orange", "assistant bpb"))):
        pts = [(i, r[metric]) for i, r in enumerate(others) if r.get(metric)]
        for i, m in pts:
            diffs.errorbar(m["diff"], i + (k - 0.5) * spread, xerr=m["ci"], fmt=marker, color=color, capsize=2,
                           mfc=color if m["beyond_noise"] else "white", label=name if i == pts[0][0] else None)
    diffs.axvline(0, color="k", lw=0.8)
    diffs.set_yticks(range(len(others)), [r["label"] for r in others])
    diffs.set_ylim(len(others) - 0.5, -0.5)  # first variant on top
    diffs.set_xlabel("variant - reference (same seed), bpb\n95% CI; filled = beyond seed noise; left = better")
    diffs.legend(fontsize=8)
    diffs.grid(True, axis="x", alpha=0.3)
    fig.savefig(path, dpi=110)
    return path
