package daemon

import (
	"context"
	"errors"
	"maps"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/overlaynet/overlay/gossip"
	"github.com/overlaynet/overlay/overlay"
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

// TestPeerStates: the registered hosts, self left out, by what gossip
// knows of them.
func TestPeerStates(t *testing.T) {
	known := map[overlay.HostID]gossip.State{"a": gossip.Alive, "b": gossip.Alive, "c": gossip.Departed, "e": gossip.Suspect}
	got := peerStates("self", []overlay.HostID{"self", "a", "b", "c", "d", "e"}, func(h overlay.HostID) gossip.State { return known[h] })
	want := map[string]int{"alive": 2, "suspect": 1, "dead": 1, "remembered": 1}
	if !maps.Equal(got, want) {
		t.Errorf("peerStates = %v, want %v", got, want)
	}
}
