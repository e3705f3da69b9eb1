package firewall

import (
	"crypto/rand"
	"encoding/hex"
	"os"
	"os/exec"
	"slices"
	"strings"
	"testing"

	"github.com/google/nftables"
	"github.com/vishvananda/netns"

	"github.com/overlaynet/overlay/overlay"
)

// newTable returns the overlay's table in a network namespace of its own,
// removed when the test ends.
func newTable(t *testing.T) *Table {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("skipping: needs root to create a network namespace and nftables tables (run the tests as root)")
	}
	b := make([]byte, 3)
	rand.Read(b)
	name := "ovfw" + hex.EncodeToString(b)
	if out, err := exec.Command("ip", "netns", "add", name).CombinedOutput(); err != nil {
		t.Fatalf("ip netns add: %v: %s", err, out)
	}
	t.Cleanup(func() { exec.Command("ip", "netns", "del", name).Run() })
	fd, err := netns.GetFromName(name)
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { fd.Close() })
	tbl, err := New(nftables.WithNetNSFd(int(fd)))
	if err != nil {
		t.Fatal(err)
	}
	return tbl
}

// TestTableConverges: Set writes the rules once, changes nothing when
// they are there, and rewrites a table deleted or changed by hand.
func TestTableConverges(t *testing.T) {
	tbl := newTable(t)
	nets := []overlay.Network{def("red", "10.1.0.0/16"), def("blue", "10.2.0.0/16")}
	if f, p, err := tbl.Comments(); err != nil || f != nil || p != nil {
		t.Fatalf("before: %v %v %v; want no table", f, p, err)
	}
	changed, err := tbl.Set(nets)
	if err != nil || !changed {
		t.Fatalf("first Set = %v, %v", changed, err)
	}
	wantF, wantP := Rules(nets)
	check := func(when string) {
		t.Helper()
		f, p, err := tbl.Comments()
		if err != nil || !slices.Equal(f, comments(wantF)) || !slices.Equal(p, comments(wantP)) {
			t.Fatalf("%s: table holds %q / %q (%v); want %q / %q", when, f, p, err, comments(wantF), comments(wantP))
		}
	}
	check("after Set")
	if changed, err := tbl.Set(nets); err != nil || changed {
		t.Fatalf("second Set = %v, %v; want no change", changed, err)
	}
	if err := tbl.Delete(); err != nil {
		t.Fatal(err)
	}
	if changed, err := tbl.Set(nets); err != nil || !changed {
		t.Fatalf("Set after the table was deleted = %v, %v", changed, err)
	}
	check("after the table was deleted")
	// A network fewer: its rules go.
	nets = nets[:1]
	wantF, wantP = Rules(nets)
	if changed, err := tbl.Set(nets); err != nil || !changed {
		t.Fatalf("Set with one network = %v, %v", changed, err)
	}
	check("after a network was deleted")
	if changed, err := tbl.Set(nil); err != nil || !changed {
		t.Fatalf("Set without networks = %v, %v", changed, err)
	}
	if f, p, _ := tbl.Comments(); len(f)+len(p) != 0 {
		t.Fatalf("rules left without networks: %v %v", f, p)
	}
	if err := tbl.Delete(); err != nil {
		t.Fatal(err)
	}
	if err := tbl.Delete(); err != nil {
		t.Fatalf("deleting a table that does not exist: %v", err)
	}
}

// TestTableCheck: Check names the rules a table lacks and those it holds
// for networks that are gone, and changes nothing.
func TestTableCheck(t *testing.T) {
	tbl := newTable(t)
	red, blue := def("red", "10.1.0.0/16"), def("blue", "10.2.0.0/16")
	wantF, wantP := Rules([]overlay.Network{red, blue})
	missing, stale, err := tbl.Check([]overlay.Network{red, blue})
	if err != nil || len(missing) != len(wantF)+len(wantP) || len(stale) != 0 {
		t.Fatalf("Check without a table = %q, %q, %v; want every rule missing", missing, stale, err)
	}
	if _, err := tbl.Set([]overlay.Network{red, blue}); err != nil {
		t.Fatal(err)
	}
	if missing, stale, err := tbl.Check([]overlay.Network{red, blue}); err != nil || len(missing)+len(stale) != 0 {
		t.Fatalf("Check after Set = %q, %q, %v", missing, stale, err)
	}
	// blue is gone from etcd but the table still holds it; green is new.
	green := def("green", "10.3.0.0/16")
	missing, stale, err = tbl.Check([]overlay.Network{red, green})
	if err != nil {
		t.Fatal(err)
	}
	for _, c := range missing {
		if !strings.Contains(c, "green") {
			t.Errorf("missing %q: not a rule about green", c)
		}
	}
	if len(missing) == 0 || len(stale) == 0 {
		t.Fatalf("Check = missing %q, stale %q; want green's missing and blue's stale", missing, stale)
	}
	for _, c := range stale {
		if !strings.Contains(c, "blue") {
			t.Errorf("stale %q: not a rule about blue", c)
		}
	}
	if f, p, _ := tbl.Comments(); !slices.Equal(f, comments(wantF)) || !slices.Equal(p, comments(wantP)) {
		t.Errorf("Check changed the table")
	}
}
