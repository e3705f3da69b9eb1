package etcd

import (
	"context"
	"testing"
	"time"
)

// TestBound: a context without a deadline gets one, requestTimeout away;
// one with a deadline, shorter or longer, keeps it.
func TestBound(t *testing.T) {
	ctx, cancel := bound(context.Background())
	defer cancel()
	d, ok := ctx.Deadline()
	if left := time.Until(d); !ok || left > requestTimeout || left < requestTimeout-time.Second {
		t.Errorf("no deadline: bound gave %s left (%v), want %s", left, ok, requestTimeout)
	}
	for _, want := range []time.Duration{time.Second, time.Minute} {
		parent, cancelParent := context.WithTimeout(context.Background(), want)
		ctx, cancel := bound(parent)
		pd, _ := parent.Deadline()
		if d, _ := ctx.Deadline(); d != pd {
			t.Errorf("deadline %s away: bound changed it to %s away", want, time.Until(d).Round(time.Second))
		}
		cancel()
		if parent.Err() != nil {
			t.Errorf("deadline %s away: bound's cancel cancelled the caller's context", want)
		}
		cancelParent()
	}
}
