package daemon

import (
	"context"
	"fmt"
	"net/http"
	"strings"
	"time"
)

// healthTimeout bounds the checks of one /readyz request.
const healthTimeout = 2 * time.Second

// healthz answers /healthz: 200 and "ok" while every network's reconcile
// loop ends passes, 503 and the reason when one has stalled (the same
// test that stops systemd's watchdog pings).
func healthz(stalled func(now time.Time) error) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		if err := stalled(time.Now()); err != nil {
			writeHealth(w, http.StatusServiceUnavailable, []string{err.Error()})
			return
		}
		writeHealth(w, http.StatusOK, []string{"ok"})
	})
}

// readyz answers /readyz: 200 and "ready" when missing finds nothing,
// else 503 and what is missing, a line each.
func readyz(missing func(ctx context.Context) []string) http.Handler {
	return http.HandlerFunc(func(w http.ResponseWriter, r *http.Request) {
		ctx, cancel := context.WithTimeout(r.Context(), healthTimeout)
		defer cancel()
		if lines := missing(ctx); len(lines) > 0 {
			writeHealth(w, http.StatusServiceUnavailable, lines)
			return
		}
		writeHealth(w, http.StatusOK, []string{"ready"})
	})
}

func writeHealth(w http.ResponseWriter, code int, lines []string) {
	w.Header().Set("Content-Type", "text/plain; charset=utf-8")
	w.Header().Set("Cache-Control", "no-store")
	w.WriteHeader(code)
	fmt.Fprintln(w, strings.Join(lines, "\n"))
}

// missing returns what keeps this host from being ready, a line each:
// etcd that does not answer, and each network that cannot serve ADD (no
// block held, the dataplane never programmed, no free address) or whose
// containers may have lost connectivity (the last pass failed, no other
// host answers gossip).
func (h *host) missing(ctx context.Context, names []string) []string {
	var out []string
	if err := h.store.Ping(ctx); err != nil {
		out = append(out, fmt.Sprintf("etcd: %v", err))
	}
	for _, name := range names {
		st, err := h.svc.Status(ctx, name)
		switch {
		case err != nil:
			out = append(out, fmt.Sprintf("network %s: %v", name, err))
		case !st.Ready:
			out = append(out, fmt.Sprintf("network %s: not ready: %s", name, st.Reason))
		case st.Degraded:
			out = append(out, fmt.Sprintf("network %s: degraded: %s", name, st.Reason))
		}
	}
	return out
}
