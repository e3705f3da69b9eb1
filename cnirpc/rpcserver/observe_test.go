package rpcserver_test

import (
	"context"
	"io"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"strings"
	"testing"

	"github.com/overlaynet/overlay/cnirpc"
	"github.com/overlaynet/overlay/cnirpc/rpcserver"
)

// failingFlush is a handler whose allocations never reach the disk.
type failingFlush struct{ *fakeHandler }

func (*failingFlush) Flush(context.Context, string) error {
	return &cnirpc.Error{Code: cnirpc.CodeTryAgainLater, Msg: "add: the allocation store failed; try again later"}
}

// TestObserveCountsOutcomes: an early ADD whose confirmation carries an
// error is observed with that error's result, not the success of its
// early answer, and with its answer and confirmation timed apart; every
// path outside the protocol is one op, "other".
func TestObserveCountsOutcomes(t *testing.T) {
	type seen struct {
		op, result string
		confirmed  bool
	}
	var got []seen
	observe := func(o rpcserver.Outcome) {
		if o.Answer <= 0 || o.Confirmation < 0 || (o.Confirmation > 0 && o.Confirmation < o.Answer) {
			t.Errorf("%s: answer %v, confirmation %v", o.Op, o.Answer, o.Confirmation)
		}
		got = append(got, seen{o.Op, o.Result, o.Confirmation > 0})
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
		{ok, "POST", "/v1/add", early, seen{"add", "ok", true}},
		{ok, "POST", "/v1/add", add, seen{"add", "ok", false}},
		{failing, "POST", "/v1/add", early, seen{"add", "try_again_later", true}},
		{failing, "POST", "/v1/add", add, seen{"add", "try_again_later", false}},
		{ok, "GET", "/v1/status?network=default", "", seen{"status", "ok", false}},
		{ok, "GET", "/v1/status", "", seen{"status", "invalid_network", false}},
		{ok, "POST", "/v1/del", "{bad json", seen{"del", "decoding_failure", false}},
		{ok, "POST", "/v1/anything-a-client-makes-up-" + strings.Repeat("x", 40), "", seen{"other", "bad_request", false}},
		{ok, "GET", "/v1/add", "", seen{"add", "bad_request", false}},
		{ok, "GET", "/metrics", "", seen{"other", "bad_request", false}},
	} {
		got = nil
		w := httptest.NewRecorder()
		tc.h.ServeHTTP(w, httptest.NewRequest(tc.method, tc.path, strings.NewReader(tc.body)))
		if len(got) != 1 || got[0] != tc.want {
			t.Errorf("%s %s %s: observed %v, want %v", tc.method, tc.path, tc.body, got, tc.want)
		}
	}
	for code, want := range map[uint]string{0: "ok", cnirpc.CodeNoAddress: "no_address", cnirpc.CodeUnknownContainer: "unknown_container", 42: "internal"} {
		if got := rpcserver.ResultOf(code); got != want {
			t.Errorf("ResultOf(%d) = %q, want %q", code, got, want)
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
