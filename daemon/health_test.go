package daemon

import (
	"context"
	"errors"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"
)

// TestHealthEndpoints: /healthz and /readyz answer 200 with "ok" and
// "ready", and 503 with what is wrong, a line each.
func TestHealthEndpoints(t *testing.T) {
	get := func(h http.Handler) (int, string) {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest("GET", "/", nil))
		if ct := rec.Header().Get("Content-Type"); !strings.HasPrefix(ct, "text/plain") {
			t.Errorf("Content-Type %q", ct)
		}
		return rec.Code, rec.Body.String()
	}
	var stalled error
	hz := healthz(func(time.Time) error { return stalled })
	if code, body := get(hz); code != 200 || body != "ok\n" {
		t.Errorf("/healthz moving: %d %q", code, body)
	}
	stalled = errors.New("the reconcile loop of network red has ended no pass for more than 20s")
	if code, body := get(hz); code != 503 || !strings.Contains(body, "network red") {
		t.Errorf("/healthz stalled: %d %q", code, body)
	}

	var missing []string
	var deadline bool
	rz := readyz(func(ctx context.Context) []string {
		_, deadline = ctx.Deadline()
		return missing
	})
	if code, body := get(rz); code != 200 || body != "ready\n" || !deadline {
		t.Errorf("/readyz ready: %d %q (checks bounded: %v)", code, body, deadline)
	}
	missing = []string{"etcd: etcd does not answer: context deadline exceeded", "network red: not ready: this host holds no block"}
	if code, body := get(rz); code != 503 || body != strings.Join(missing, "\n")+"\n" {
		t.Errorf("/readyz not ready: %d %q", code, body)
	}
}
