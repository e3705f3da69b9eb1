package backoff_test

import (
	"math/rand/v2"
	"testing"
	"time"

	"github.com/overlaynet/overlay/internal/backoff"
)

func TestJitter(t *testing.T) {
	for _, tc := range []struct {
		d        time.Duration
		fraction float64
		u        float64
		want     time.Duration
	}{
		{time.Second, 0.5, 0, time.Second},
		{time.Second, 0.5, 0.5, 750 * time.Millisecond},
		{time.Second, 0.5, 0.999999, 500*time.Millisecond + 500*time.Nanosecond},
		{time.Second, 0, 0.7, time.Second},                    // no jitter
		{time.Second, 2, 0.5, 500 * time.Millisecond},         // fraction clamped to 1
		{time.Second, -1, 0.5, time.Second},                   // and to 0
		{time.Second, 0.5, 3, 500 * time.Millisecond},         // u clamped to 1
		{time.Second, 0.5, -3, time.Second},                   // and to 0
		{0, 0.5, 0.5, 0},                                      // nothing to spread
		{-time.Second, 0.5, 0.5, 0},                           // nor a negative wait
		{3 * time.Second, 0.2, 0.25, 2850 * time.Millisecond}, // a quarter of the way down to 2.4s
	} {
		if got := backoff.Jitter(tc.d, tc.fraction, tc.u); got != tc.want {
			t.Errorf("Jitter(%s, %g, %g) = %s, want %s", tc.d, tc.fraction, tc.u, got, tc.want)
		}
	}
}

// TestJitterSpreads: waits drawn from a seeded source stay in range and
// are not all the same.
func TestJitterSpreads(t *testing.T) {
	r := rand.New(rand.NewPCG(1, 2))
	seen := make(map[time.Duration]bool)
	for range 1000 {
		d := backoff.Jitter(time.Second, 0.5, r.Float64())
		if d < 500*time.Millisecond || d > time.Second {
			t.Fatalf("Jitter(1s, 0.5) = %s, outside [500ms, 1s]", d)
		}
		seen[d.Truncate(50*time.Millisecond)] = true
	}
	if len(seen) < 10 {
		t.Errorf("1000 waits fell in only %d of the 10 50ms buckets between 500ms and 1s", len(seen))
	}
}
