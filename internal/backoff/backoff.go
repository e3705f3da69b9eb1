// Package backoff computes the waits between retries, with jitter, so
// that hosts that failed at the same moment (an etcd outage ends for all
// of them at once) do not retry in lockstep.
package backoff

import "time"

// Jitter returns a wait of at most d and at least d·(1−fraction), placed
// in that range by u, a uniform random number in [0, 1) such as
// math/rand/v2's Float64. A fraction outside [0, 1] is clamped, and so is
// u. The wait is never longer than d, so jitter spreads the retries of
// many hosts without delaying any of them past d.
//
// It is a pure function: the caller brings the randomness, which keeps
// tests deterministic.
func Jitter(d time.Duration, fraction, u float64) time.Duration {
	if d <= 0 {
		return 0
	}
	fraction = min(max(fraction, 0), 1)
	u = min(max(u, 0), 1)
	return d - time.Duration(float64(d)*fraction*u)
}
