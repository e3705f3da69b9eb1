package rpcserver_test

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"
	"time"

	"github.com/overlaynet/overlay/cnirpc"
	"github.com/overlaynet/overlay/cnirpc/rpcserver"
)

// failingFlush is a handler whose allocations never reach the disk.
type failingFlush struct{ *fakeHandler }

func (*failingFlush) Flush(context.Context, string) error {
	return &cnirpc.Error{Code: cnirpc.CodeTryAgainLater, Msg: "add: the allocation store failed; try again later"}
}

// TestObserveCountsOutcomes: an early ADD whose confirmation carries an
// error is observed with that error's status, not the 200 of its early
// answer; every path outside the protocol is one op, "other".
func TestObserveCountsOutcomes(t *testing.T) {
	type seen struct {
		op     string
		status int
	}
	var got []seen
	observe := func(op string, status int, took time.Duration) {
		if took <= 0 {
			t.Errorf("%s took %v", op, took)
		}
		got = append(got, seen{op, status})
	}
	log := slog.New(slog.DiscardHandler)
	ok := rpcserver.Observed(rpcserver.NewHandler(&fakeHandler{}, log), observe)
	failing := rpcserver.Observed(rpcserver.NewHandler(&failingFlush{&fakeHandler{}}, log), observe)
	add := `{"network":"default","containerID":"c","ifName":"eth0"}`
	early := `{"network":"default","containerID":"c","ifName":"eth0","early":true}`
	for _, tc := range []struct {
		h          http.Handler
		method     string
		path, body string
		want       seen
	}{
		{ok, "POST", "/v1/add", early, seen{"add", 200}},
		{failing, "POST", "/v1/add", early, seen{"add", 503}},
		{failing, "POST", "/v1/add", add, seen{"add", 503}},
		{ok, "GET", "/v1/status?network=default", "", seen{"status", 200}},
		{ok, "POST", "/v1/del", "{bad json", seen{"del", 400}},
		{ok, "POST", "/v1/anything-a-client-makes-up-" + strings.Repeat("x", 40), "", seen{"other", 404}},
		{ok, "GET", "/metrics", "", seen{"other", 404}},
	} {
		got = nil
		w := httptest.NewRecorder()
		tc.h.ServeHTTP(w, httptest.NewRequest(tc.method, tc.path, strings.NewReader(tc.body)))
		if len(got) != 1 || got[0] != tc.want {
			t.Errorf("%s %s %s: observed %v, want %v", tc.method, tc.path, tc.body, got, tc.want)
		}
	}
	// The early answer still reaches the plugin before the confirmation.
	w := httptest.NewRecorder()
	failing.ServeHTTP(w, httptest.NewRequest("POST", "/v1/add", strings.NewReader(early)))
	body, _ := io.ReadAll(w.Result().Body)
	if !strings.Contains(string(body), `"confirm":true`) || !strings.Contains(string(body), "allocation store failed") {
		t.Errorf("early ADD with a failed flush answered:\n%s", body)
	}
}
