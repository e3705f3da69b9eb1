package daemon

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"net/http"
	"net/http/httptest"
	"net/netip"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/overlaynet/overlay/attach"
	"github.com/overlaynet/overlay/ctlapi"
	"github.com/overlaynet/overlay/gossip"
	"github.com/overlaynet/overlay/ipam/etcd"
	"github.com/overlaynet/overlay/overlay"
	"github.com/overlaynet/overlay/overlay/mesh"
)

// TestPersisting: a difference that a reconcile pass repairs is not
// reported; one that outlasts it is, once; a failed read is an error.
func TestPersisting(t *testing.T) {
	ctx := context.Background()
	transient := overlay.Difference{Kind: "fdb", Want: "02:00:00:00:00:0b dst 198.18.0.2"}
	lasting := overlay.Difference{Kind: "route", Want: "198.19.0.64/26 via 198.18.0.2"}
	desired := func(context.Context) (overlay.DataplaneConfig, error) { return overlay.DataplaneConfig{}, nil }
	checks := 0
	check := func(context.Context, overlay.DataplaneConfig) ([]overlay.Difference, error) {
		checks++
		if checks == 1 {
			return []overlay.Difference{transient, lasting}, nil
		}
		return []overlay.Difference{lasting, {Kind: "neighbour", Want: "appeared between the checks"}}, nil
	}
	settled := 0
	got, err := persisting(ctx, desired, check, func(context.Context) { settled++ })
	if err != nil || len(got) != 1 || got[0] != lasting || settled != 1 {
		t.Fatalf("persisting = %v, %v (settled %d); want only the lasting difference, after one settle", got, err, settled)
	}

	checks, settled = 0, 0
	clean := func(context.Context, overlay.DataplaneConfig) ([]overlay.Difference, error) {
		checks++
		return nil, nil
	}
	if got, err := persisting(ctx, desired, clean, func(context.Context) { settled++ }); err != nil || len(got) != 0 || settled != 0 || checks != 1 {
		t.Fatalf("a clean dataplane: %v, %v, settled %d, checks %d; want one check and no wait", got, err, settled, checks)
	}

	down := errors.New("etcd does not answer")
	failing := func(context.Context) (overlay.DataplaneConfig, error) { return overlay.DataplaneConfig{}, down }
	if _, err := persisting(ctx, failing, check, func(context.Context) {}); !errors.Is(err, down) {
		t.Fatalf("a failed read: %v", err)
	}
}

func TestDifferenceFinding(t *testing.T) {
	stale := differenceFinding("red", overlay.Difference{Kind: "route", Have: "198.19.3.0/26 via 198.18.0.9"}, nil)
	if stale.Severity != ctlapi.Warning || stale.Network != "red" || !strings.Contains(stale.Problem, "stale") || !strings.Contains(stale.Fix, "keeps adding it back") {
		t.Errorf("stale entry: %+v", stale)
	}
	missing := differenceFinding("red", overlay.Difference{Kind: "fdb", Want: "02:00:00:00:00:0b dst 198.18.0.2"}, errors.New("file exists"))
	if missing.Severity != ctlapi.Error || !strings.Contains(missing.Fix, "its last pass failed: file exists") || !strings.Contains(missing.Fix, "component=reconcile") {
		t.Errorf("missing entry: %+v", missing)
	}
}

// TestPeerFindings: a host that etcd says is alive but gossip does not
// see, and one that gossip sees without a liveness key, are each named
// with the fix; agreeing hosts, this host and unregistered ones are not.
func TestPeerFindings(t *testing.T) {
	rec := func(h overlay.HostID) *etcd.HostRecord {
		return &etcd.HostRecord{Host: h, Gossip: "198.18.0.9:7946"}
	}
	live := &etcd.LiveRecord{}
	states := []etcd.HostState{
		{Host: "self", Record: rec("self"), Live: live},
		{Host: "fine", Record: rec("fine"), Live: live},
		{Host: "unheard", Record: rec("unheard"), Live: live},
		{Host: "failed", Record: rec("failed"), Live: live},
		{Host: "suspected", Record: rec("suspected"), Live: live},
		{Host: "cut-off", Record: rec("cut-off")},
		{Host: "down", Record: rec("down")},
		{Host: "unregistered", Live: live},
	}
	gs := map[overlay.HostID]gossip.State{"fine": gossip.Alive, "failed": gossip.Departed, "suspected": gossip.Suspect, "cut-off": gossip.Alive, "unregistered": gossip.Alive}
	got := peerFindings("self", states, func(h overlay.HostID) gossip.State { return gs[h] })
	if len(got) != 4 {
		t.Fatalf("findings %+v; want unheard, failed, suspected and cut-off", got)
	}
	for i, want := range []struct{ host, says, fix string }{
		{"unheard", "has not heard from it", "UDP and TCP 198.18.0.9:7946"},
		{"failed", "marked it failed", "--gossip-key-file"},
		{"suspected", "suspects it: its probes got no ack", "UDP and TCP"},
		{"cut-off", "no liveness key", "check etcd from host cut-off"},
	} {
		f := got[i]
		if !strings.Contains(f.Problem, "host "+want.host) || !strings.Contains(f.Problem, want.says) || !strings.Contains(f.Fix, want.fix) || f.Severity != ctlapi.Warning {
			t.Errorf("finding %d = %+v; want %s: %q, fix %q", i, f, want.host, want.says, want.fix)
		}
	}
}

// fakeControl is a controlPlane that answers from fields.
type fakeControl struct {
	releaseErr error
	released   ctlapi.ReleaseRequest
}

func (f *fakeControl) status(context.Context) ctlapi.Status { return ctlapi.Status{Host: "h1"} }
func (f *fakeControl) doctor(context.Context) ctlapi.Report {
	return ctlapi.Report{Host: "h1", Findings: []ctlapi.Finding{{Severity: ctlapi.Error, Check: "forwarding"}}}
}
func (f *fakeControl) release(_ context.Context, req ctlapi.ReleaseRequest) (ctlapi.ReleaseResponse, error) {
	f.released = req
	return ctlapi.ReleaseResponse{Key: overlay.AttachmentKey{ContainerID: "c1", IfName: "eth0"}}, f.releaseErr
}

// TestControlHandler: the answers, and the status codes and messages of
// bad requests and refusals.
func TestControlHandler(t *testing.T) {
	fc := &fakeControl{}
	h := controlHandler(fc, slog.New(slog.DiscardHandler))
	do := func(method, path, body string) (int, string) {
		rec := httptest.NewRecorder()
		h.ServeHTTP(rec, httptest.NewRequest(method, path, strings.NewReader(body)))
		return rec.Code, rec.Body.String()
	}
	var st ctlapi.Status
	if code, body := do("GET", ctlapi.StatusPath, ""); code != 200 || json.Unmarshal([]byte(body), &st) != nil || st.Host != "h1" {
		t.Errorf("status: %d %s", code, body)
	}
	var r ctlapi.Report
	if code, body := do("POST", ctlapi.DoctorPath, ""); code != 200 || json.Unmarshal([]byte(body), &r) != nil || len(r.Findings) != 1 {
		t.Errorf("doctor: %d %s", code, body)
	}
	if code, _ := do("GET", ctlapi.DoctorPath, ""); code != http.StatusMethodNotAllowed {
		t.Errorf("GET doctor: %d; want 405", code)
	}
	if code, body := do("POST", ctlapi.ReleasePath, `{"network":"red","addr":"10.1.0.5"}`); code != 200 || fc.released.Addr != netip.MustParseAddr("10.1.0.5") || !strings.Contains(body, "c1") {
		t.Errorf("release: %d %s (%+v)", code, body, fc.released)
	}
	for _, bad := range []struct {
		body string
		code int
		says string
	}{
		{`{"network":"red","addr":"10.1.0.5","frob":1}`, 400, "malformed request"},
		{`{"network":"red","addr":"::1"}`, 400, "IPv4"},
		{`{"network":"red"`, 400, "malformed"},
		{`{"addr":"10.1.0.5"}`, 400, "want a network"},
		{`{"network":"red","addr":"10.1.0.5","pad":"` + strings.Repeat("x", 8<<10) + `"}`, 400, "malformed"},
	} {
		if code, body := do("POST", ctlapi.ReleasePath, bad.body); code != bad.code || !strings.Contains(body, bad.says) {
			t.Errorf("release %.60s: %d %s; want %d saying %q", bad.body, code, body, bad.code, bad.says)
		}
	}
	for kind, code := range map[attach.Kind]int{attach.NotFound: 404, attach.UnknownNetwork: 404, attach.Invalid: 409, attach.Starting: 503, attach.Internal: 500} {
		fc.releaseErr = &attach.Error{Kind: kind, Msg: "refused for a reason"}
		if got, body := do("POST", ctlapi.ReleasePath, `{"network":"red","addr":"10.1.0.5"}`); got != code || !strings.Contains(body, "refused for a reason") {
			t.Errorf("release refused with kind %d: %d %s; want %d", kind, got, body, code)
		}
	}
}

// TestMeshFindings: a pair cut and a pair too narrow for the MTU are each
// an error that names the peer, its underlay address, since when and the
// fix; a pair to a host that is down is a warning that says so; a
// reachable pair and one not decided yet are not findings. The text is
// the same run after run while the fault lasts.
func TestMeshFindings(t *testing.T) {
	since := time.Date(2026, 12, 3, 7, 0, 0, 0, time.UTC)
	lost := fmt.Errorf("no answer: %w", context.DeadlineExceeded)
	p := mesh.New(mesh.Config{}, nil, nil)
	tg := func(peer string, last byte) mesh.Target {
		return mesh.Target{Network: "red", Peer: overlay.HostID(peer), Addr: netip.AddrFrom4([4]byte{10, 1, 0, last}), MTU: 1450}
	}
	for range 2 {
		p.Record(tg("b", 65), 0, lost, lost, since)
		p.Record(tg("c", 129), time.Millisecond, nil, lost, since)
		p.Record(tg("d", 193), time.Millisecond, nil, nil, since)
		p.Record(tg("gone", 9), 0, lost, lost, since)
	}
	p.Record(tg("e", 33), 0, lost, lost, since)
	underlay := map[overlay.HostID]netip.Addr{"b": netip.MustParseAddr("198.18.0.2"), "c": netip.MustParseAddr("198.18.0.3")}
	down := map[overlay.HostID]bool{"gone": true}
	got := meshFindings(netip.MustParseAddr("198.18.0.1"), p.States(), underlay, down)
	if len(got) != 3 {
		t.Fatalf("findings %+v; want b's, c's and gone's", got)
	}
	if f := got[0]; f.Severity != ctlapi.Error || f.Network != "red" || !strings.Contains(f.Problem, "host b does not answer") || !strings.Contains(f.Problem, "since 2026-12-03T07:00:00Z") ||
		!strings.Contains(f.Fix, "198.18.0.1") || !strings.Contains(f.Fix, "198.18.0.2") {
		t.Errorf("cut pair: %+v", f)
	}
	if f := got[1]; !strings.Contains(f.Problem, "host c answers small probes but not full-size ones (1450 bytes") || !strings.Contains(f.Fix, "must carry 1500 bytes") {
		t.Errorf("narrow pair: %+v", f)
	}
	if f := got[2]; f.Severity != ctlapi.Warning || !strings.Contains(f.Problem, "liveness key is gone") || !strings.Contains(f.Fix, "overlayctl host remove gone") {
		t.Errorf("a pair to a host that is down: %+v", f)
	}
	if again := meshFindings(netip.MustParseAddr("198.18.0.1"), p.States(), underlay, down); !slices.Equal(again, got) {
		t.Errorf("the findings changed between two runs:\n%+v\n%+v", got, again)
	}
}
