package bench

import (
	"math"
	"slices"
)

// Median of xs, ignoring NaNs (a repetition without that figure); NaN when
// nothing is left. An even count averages the middle two.
func Median(xs []float64) float64 { return Percentile(xs, 50) }

// Percentile p (0..100) of xs by linear interpolation between closest ranks
// (numpy's default), ignoring NaNs; NaN when xs has no number.
func Percentile(xs []float64, p float64) float64 {
	s := make([]float64, 0, len(xs))
	for _, x := range xs {
		if !math.IsNaN(x) {
			s = append(s, x)
		}
	}
	if len(s) == 0 || math.IsNaN(p) {
		return math.NaN()
	}
	slices.Sort(s)
	p = min(max(p, 0), 100)
	rank := p / 100 * float64(len(s)-1)
	lo := int(math.Floor(rank))
	hi := int(math.Ceil(rank))
	return s[lo] + (s[hi]-s[lo])*(rank-float64(lo))
}

// LinearFit is the least-squares line y = Intercept + Slope*x through points.
type LinearFit struct{ Slope, Intercept float64 }

// Fit fits a line to (xs[i], ys[i]); ok is false with fewer than two
// distinct xs or mismatched lengths.
func Fit(xs, ys []float64) (f LinearFit, ok bool) {
	if len(xs) != len(ys) || len(xs) < 2 {
		return LinearFit{}, false
	}
	n := float64(len(xs))
	var sx, sy float64
	for i := range xs {
		sx += xs[i]
		sy += ys[i]
	}
	mx, my := sx/n, sy/n
	var sxx, sxy float64
	for i := range xs {
		sxx += (xs[i] - mx) * (xs[i] - mx)
		sxy += (xs[i] - mx) * (ys[i] - my)
	}
	if sxx == 0 {
		return LinearFit{}, false
	}
	f.Slope = sxy / sxx
	f.Intercept = my - f.Slope*mx
	return f, true
}

func sortStrings(s []string) { slices.Sort(s) }
