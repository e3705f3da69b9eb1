package vxlan

import (
	"net"
	"net/netip"
	"slices"
	"strings"
	"sync"
	"testing"

	"github.com/overlaynet/overlay/overlay"
	"github.com/overlaynet/overlay/overlay/overlaytest"
)

func testNetwork() overlay.Network {
	return overlay.Network{
		Name:      "test",
		CIDR:      netip.MustParsePrefix("198.19.0.0/16"),
		BlockBits: overlay.DefaultBlockBits,
		VNI:       overlay.DefaultVNI,
		Port:      overlay.DefaultPort,
	}
}

func mustMAC(s string) net.HardwareAddr {
	hw, err := net.ParseMAC(s)
	if err != nil {
		panic(err)
	}
	return hw
}

func prefixes(ss ...string) []netip.Prefix {
	var out []netip.Prefix
	for _, s := range ss {
		out = append(out, netip.MustParsePrefix(s))
	}
	return out
}

func TestDesiredMatchesConfigText(t *testing.T) {
	cfg := overlay.DataplaneConfig{
		Network:  testNetwork(),
		Underlay: netip.MustParseAddr("198.18.0.1"),
		MTU:      1450,
		VTEPMAC:  mustMAC("02:00:00:00:00:01"),
		Blocks:   prefixes("198.19.0.0/26", "198.19.1.0/26"),
		Peers: []overlay.Peer{
			{Host: "b", Underlay: netip.MustParseAddr("198.18.0.2"), VTEPMAC: mustMAC("02:00:00:00:00:02"), Blocks: prefixes("198.19.0.64/26", "198.19.2.0/26")},
			{Host: "c", Underlay: netip.MustParseAddr("198.18.0.3"), VTEPMAC: mustMAC("02:00:00:00:00:03")},
		},
	}
	s, err := desired(cfg)
	if err != nil {
		t.Fatalf("desired: %v", err)
	}
	if got, want := s.text(), overlaytest.ConfigText(cfg); got != want {
		t.Errorf("text:\n%s\nwant:\n%s", got, want)
	}
	for _, r := range s.Routes {
		if r.Src != netip.MustParseAddr("198.19.0.1") || !r.OnLink || r.Proto != RouteProtocol || r.Metric != 0 {
			t.Errorf("route %+v: want src 198.19.0.1, onlink, protocol %d, metric 0", r, RouteProtocol)
		}
	}
}

func TestDesiredNoLocalBlocksHasNoSource(t *testing.T) {
	cfg := overlay.DataplaneConfig{
		Network: testNetwork(),
		Peers: []overlay.Peer{
			{Host: "b", Underlay: netip.MustParseAddr("198.18.0.2"), VTEPMAC: mustMAC("02:00:00:00:00:02"), Blocks: prefixes("198.19.0.64/26")},
		},
	}
	s, err := desired(cfg)
	if err != nil {
		t.Fatalf("desired: %v", err)
	}
	if len(s.Routes) != 1 || s.Routes[0].Src.IsValid() {
		t.Errorf("routes %+v: want one without a source", s.Routes)
	}
}

func TestDesiredSkipsInvalidEntries(t *testing.T) {
	good := overlay.Peer{Host: "b", Underlay: netip.MustParseAddr("198.18.0.2"), VTEPMAC: mustMAC("02:00:00:00:00:02"), Blocks: prefixes("198.19.0.64/26")}
	cfg := overlay.DataplaneConfig{
		Network: testNetwork(),
		Blocks:  prefixes("198.19.0.0/26", "10.0.0.0/26", "198.19.0.0/24"),
		Peers: []overlay.Peer{
			good,
			{Host: "badaddr", Underlay: netip.MustParseAddr("2001:db8::1"), VTEPMAC: mustMAC("02:00:00:00:00:03")},
			{Host: "badmac", Underlay: netip.MustParseAddr("198.18.0.4"), VTEPMAC: net.HardwareAddr{1, 2}},
			{Host: "dupblock", Underlay: netip.MustParseAddr("198.18.0.5"), VTEPMAC: mustMAC("02:00:00:00:00:05"), Blocks: prefixes("198.19.0.64/26", "198.19.0.128/26")},
			{Host: "outside", Underlay: netip.MustParseAddr("198.18.0.6"), VTEPMAC: mustMAC("02:00:00:00:00:06"), Blocks: prefixes("0.0.0.0/0")},
			{Host: "dupaddr", Underlay: netip.MustParseAddr("198.18.0.2"), VTEPMAC: mustMAC("02:00:00:00:00:07")},
		},
	}
	s, err := desired(cfg)
	if err == nil {
		t.Fatal("desired: no error, want one per invalid entry")
	}
	for _, word := range []string{"10.0.0.0/26", "198.19.0.0/24", "badaddr", "badmac", "dupblock", "0.0.0.0/0", "dupaddr"} {
		if !strings.Contains(err.Error(), word) {
			t.Errorf("error %q does not mention %s", err, word)
		}
	}
	want := strings.Join([]string{
		"fdb 02:00:00:00:00:02 dst 198.18.0.2",
		"fdb 02:00:00:00:00:05 dst 198.18.0.5",
		"fdb 02:00:00:00:00:06 dst 198.18.0.6",
		"gateway 198.19.0.1/26",
		"neigh 198.18.0.2 lladdr 02:00:00:00:00:02",
		"neigh 198.18.0.5 lladdr 02:00:00:00:00:05",
		"neigh 198.18.0.6 lladdr 02:00:00:00:00:06",
		"route 198.19.0.128/26 via 198.18.0.5",
		"route 198.19.0.64/26 via 198.18.0.2",
	}, "\n")
	if got := s.text(); got != want {
		t.Errorf("text:\n%s\nwant:\n%s", got, want)
	}
}

func TestDiff(t *testing.T) {
	a := netip.MustParseAddr("198.18.0.1")
	b := netip.MustParseAddr("198.18.0.2")
	c := netip.MustParseAddr("198.18.0.3")
	m1 := mac{2, 0, 0, 0, 0, 1}
	m2 := mac{2, 0, 0, 0, 0, 2}
	byIP := func(e neighEntry) netip.Addr { return e.IP }

	tests := []struct {
		name           string
		want, have     []neighEntry
		wantAdd, wantD []neighEntry
	}{
		{name: "empty"},
		{name: "all new", want: []neighEntry{{a, m1}, {b, m2}}, wantAdd: []neighEntry{{a, m1}, {b, m2}}},
		{name: "all stale", have: []neighEntry{{a, m1}}, wantD: []neighEntry{{a, m1}}},
		{name: "same", want: []neighEntry{{a, m1}}, have: []neighEntry{{a, m1}}},
		{
			// A changed value is replaced, never deleted after.
			name:    "changed",
			want:    []neighEntry{{a, m2}},
			have:    []neighEntry{{a, m1}},
			wantAdd: []neighEntry{{a, m2}},
		},
		{
			name:    "mixed",
			want:    []neighEntry{{a, m1}, {b, m1}},
			have:    []neighEntry{{a, m1}, {c, m2}},
			wantAdd: []neighEntry{{b, m1}},
			wantD:   []neighEntry{{c, m2}},
		},
	}
	for _, tt := range tests {
		t.Run(tt.name, func(t *testing.T) {
			add, del := diff(tt.want, tt.have, byIP)
			if !slices.Equal(add, tt.wantAdd) || !slices.Equal(del, tt.wantD) {
				t.Errorf("diff = add %v, del %v; want add %v, del %v", add, del, tt.wantAdd, tt.wantD)
			}
		})
	}
}

func TestDiffRoutesByKey(t *testing.T) {
	dst := netip.MustParsePrefix("198.19.0.64/26")
	old := routeEntry{Dst: dst, Gw: netip.MustParseAddr("198.18.0.2"), OnLink: true, Proto: RouteProtocol}
	moved := old
	moved.Gw = netip.MustParseAddr("198.18.0.9")
	other := old
	other.Metric = 100

	add, del := diff([]routeEntry{moved}, []routeEntry{old, other}, routeEntry.key)
	if !slices.Equal(add, []routeEntry{moved}) {
		t.Errorf("add = %v, want the moved route", add)
	}
	if !slices.Equal(del, []routeEntry{other}) {
		t.Errorf("del = %v, want only the route of another metric", del)
	}
}

func TestNewNilLogger(t *testing.T) {
	if l := New(nil, nil, nil); l.log == nil {
		t.Error("New(nil, nil) has a nil logger")
	}
}

// TestStatsWhilePassing: a scrape reads the counts while a pass writes
// them (run with -race), and what it gets is its own copy.
func TestStatsWhilePassing(t *testing.T) {
	l := New(nil, nil, nil)
	var wg sync.WaitGroup
	wg.Go(func() {
		for range 1000 {
			l.record("fdb", 2, 1, 0)
		}
	})
	for range 1000 {
		st := l.Stats()
		st.Entries["fdb"] = -1 // the caller's map, not the dataplane's
	}
	wg.Wait()
	l.forget()
	if st := l.Stats(); st.Entries["fdb"] != 0 || st.Added["fdb"] != 1000 {
		t.Errorf("after 1000 passes and forget: %+v", st)
	}
}

func TestStateTextRouteWithoutGateway(t *testing.T) {
	s := state{Routes: []routeEntry{{Dst: netip.MustParsePrefix("198.19.9.0/24")}}}
	if got, want := s.text(), "route 198.19.9.0/24"; got != want {
		t.Errorf("text = %q, want %q", got, want)
	}
}
