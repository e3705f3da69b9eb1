// Package e2e runs the real overlayd and overlay-cni on simulated hosts
// (network namespaces on one machine). It needs root and skips without.
package e2e

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"strings"
	"testing"
	"time"

	"github.com/overlaynet/overlay/internal/simnet"
)

var bins struct{ overlayd, cni string }

func TestMain(m *testing.M) {
	if os.Getenv(rogueEnv) != "" {
		os.Exit(rogueMain())
	}
	if os.Geteuid() != 0 {
		fmt.Println("e2e: skipping: the end-to-end tests need root (network namespaces, veth, VXLAN); run them with sudo")
		os.Exit(m.Run())
	}
	// The reference plugins and cnitool too, beside overlay-cni on the
	// CNI path, for the chaining and client tests.
	b, err := simnet.BuildAll(context.Background(), true)
	if err != nil {
		fmt.Fprintln(os.Stderr, err)
		os.Exit(1)
	}
	bins.overlayd, bins.cni = b.Overlayd, b.CNI
	code := m.Run()
	b.Remove()
	os.Exit(code)
}

// newNet starts hosts simulated hosts with overlayd running on each, and
// removes everything when the test ends.
func newNet(t *testing.T, hosts int) *simnet.Net {
	t.Helper()
	n := newStoppedNet(t, hosts)
	for _, h := range n.Hosts {
		if err := h.Start(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	return n
}

// newStoppedNet creates the hosts without starting overlayd.
func newStoppedNet(t *testing.T, hosts int) *simnet.Net {
	t.Helper()
	if os.Geteuid() != 0 {
		t.Skip("needs root: network namespaces, veth and VXLAN devices")
	}
	ctx := context.Background()
	n, err := simnet.New(ctx, simnet.Options{Hosts: hosts, Overlayd: bins.overlayd, CNI: bins.cni})
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		if t.Failed() {
			dumpLogs(t, n)
		}
		if err := n.Close(); err != nil {
			t.Errorf("cleanup: %v", err)
		}
	})
	return n
}

func dumpLogs(t *testing.T, n *simnet.Net) {
	for _, h := range n.Hosts {
		f, err := os.Open(h.DataDir + "/overlayd.log")
		if err != nil {
			continue
		}
		b, _ := io.ReadAll(f)
		f.Close()
		t.Logf("--- overlayd log of %s ---\n%s", h.Name, b)
	}
}

// eventually polls cond until it returns nil or the deadline passes.
func eventually(t *testing.T, within time.Duration, what string, cond func() error) {
	t.Helper()
	deadline := time.Now().Add(within)
	for {
		err := cond()
		if err == nil {
			return
		}
		if time.Now().After(deadline) {
			t.Fatalf("%s: not within %s: %v", what, within, err)
		}
		time.Sleep(100 * time.Millisecond)
	}
}

func ipOut(t *testing.T, h *simnet.Host, args ...string) string {
	t.Helper()
	out, err := h.Exec(context.Background(), args...)
	if err != nil {
		t.Fatalf("%v", err)
	}
	return string(out)
}

// addContainer adds the container id on host h, and fails t if it cannot.
func addContainer(t *testing.T, n *simnet.Net, h *simnet.Host, id string) *simnet.Container {
	t.Helper()
	c, err := n.AddContainer(context.Background(), h, id)
	if err != nil {
		t.Fatal(err)
	}
	return c
}

// pair adds a container named a on host ha and one named b on host hb,
// and waits until a reaches b across the overlay.
func pair(t *testing.T, n *simnet.Net, ha *simnet.Host, a string, hb *simnet.Host, b string) (*simnet.Container, *simnet.Container) {
	t.Helper()
	ctx := context.Background()
	ca := addContainer(t, n, ha, a)
	cb := addContainer(t, n, hb, b)
	eventually(t, 20*time.Second, "ping across hosts", func() error { return ca.Ping(ctx, cb.Addr.Addr(), 1) })
	return ca, cb
}

// TestCrossHostReachability: 3 hosts with 2 containers each; every
// container reaches every other, across hosts.
func TestCrossHostReachability(t *testing.T) {
	n := newNet(t, 3)
	ctx := context.Background()
	var cs []*simnet.Container
	for _, h := range n.Hosts {
		for j := 1; j <= 2; j++ {
			c := addContainer(t, n, h, fmt.Sprintf("h%dc%d", h.Index, j))
			cs = append(cs, c)
		}
	}
	seen := map[netip.Addr]string{}
	for _, c := range cs {
		if prev, dup := seen[c.Addr.Addr()]; dup {
			t.Fatalf("%s and %s share %s", prev, c.ID, c.Addr)
		}
		seen[c.Addr.Addr()] = c.ID
		if !simnet.OverlayCIDR.Contains(c.Addr.Addr()) {
			t.Fatalf("%s got %s outside the overlay", c.ID, c.Addr)
		}
	}
	// Gossip converges within a moment of the last start.
	eventually(t, 20*time.Second, "first cross-host ping", func() error {
		return cs[0].Ping(ctx, cs[len(cs)-1].Addr.Addr(), 1)
	})
	for _, from := range cs {
		for _, to := range cs {
			if from == to {
				continue
			}
			if err := from.Ping(ctx, to.Addr.Addr(), 1); err != nil {
				t.Errorf("%v", err)
			}
		}
	}
}

// TestRestartKeepsFlowsAndBlock: a TCP stream crosses host 2 while its
// overlayd restarts; the stream survives and the host keeps its block.
func TestRestartKeepsFlowsAndBlock(t *testing.T) {
	n := newNet(t, 3)
	ctx := context.Background()
	h1, h2 := n.Hosts[0], n.Hosts[1]
	client, server := pair(t, n, h1, "client", h2, "server")

	// A round trip slower than a second means the restart cut the flow
	// for a while, even if TCP's retransmissions then hid it.
	rounds, stop := echoStream(t, client, server, 5001, time.Second)

	blockBefore := ipOut(t, h2, "ip", "-4", "-o", "addr", "show", "dev", n.Network.BridgeName())
	time.Sleep(500 * time.Millisecond)
	if err := h2.Stop(); err != nil {
		t.Fatal(err)
	}
	// Down for a while: longer than gossip takes to suspect it.
	time.Sleep(3 * time.Second)
	if err := h2.Start(ctx); err != nil {
		t.Fatal(err)
	}
	before := rounds.Load()
	time.Sleep(2 * time.Second)
	if err := stop(); err != nil {
		t.Fatalf("stream broke across the restart: %v", err)
	}
	if rounds.Load() <= before {
		t.Fatalf("stream made no progress after the restart (%d rounds before, %d after)", before, rounds.Load())
	}
	if after := ipOut(t, h2, "ip", "-4", "-o", "addr", "show", "dev", n.Network.BridgeName()); after != blockBefore {
		t.Fatalf("host changed its block across the restart:\nbefore: %s\nafter:  %s", blockBefore, after)
	}
	t.Logf("%d echo round trips, %d of them after the restart", rounds.Load(), rounds.Load()-before)
}

// TestTeardownRemovesHostEverywhere: host 3 leaves for good; the others
// remove its routes, neighbour and FDB entries.
func TestTeardownRemovesHostEverywhere(t *testing.T) {
	n := newNet(t, 3)
	h3 := n.Hosts[2]
	underlay := h3.Underlay.String()
	vx := n.Network.VXLANName()
	for _, h := range n.Hosts[:2] {
		eventually(t, 20*time.Second, h.Name+" programs host 3", func() error {
			if out := ipOut(t, h, "ip", "-4", "route", "show", "dev", vx); !strings.Contains(out, "via "+underlay) {
				return fmt.Errorf("routes: %s", out)
			}
			return nil
		})
	}
	if err := h3.Stop(); err != nil {
		t.Fatal(err)
	}
	if err := h3.Teardown(context.Background()); err != nil {
		t.Fatal(err)
	}
	for _, h := range n.Hosts[:2] {
		eventually(t, 20*time.Second, h.Name+" forgets host 3", func() error {
			routes := ipOut(t, h, "ip", "-4", "route", "show", "dev", vx)
			neigh := ipOut(t, h, "ip", "-4", "neigh", "show", "dev", vx)
			fdb := ipOut(t, h, "bridge", "fdb", "show", "dev", vx)
			if strings.Contains(routes+neigh+fdb, underlay) {
				return fmt.Errorf("still there:\nroutes: %s\nneigh: %s\nfdb: %s", routes, neigh, fdb)
			}
			return nil
		})
	}
	if out := ipOut(t, h3, "ip", "link", "show"); strings.Contains(out, vx) || strings.Contains(out, n.Network.BridgeName()) {
		t.Fatalf("teardown left devices on host 3:\n%s", out)
	}
}

// TestDeletedDeviceComesBack: the VXLAN device deleted by hand is
// recreated with all its entries, and traffic flows again.
func TestDeletedDeviceComesBack(t *testing.T) {
	n := newNet(t, 2)
	ctx := context.Background()
	h1, h2 := n.Hosts[0], n.Hosts[1]
	a := addContainer(t, n, h1, "a")
	b := addContainer(t, n, h2, "b")
	eventually(t, 20*time.Second, "ping across hosts", func() error { return a.Ping(ctx, b.Addr.Addr(), 1) })
	vx := n.Network.VXLANName()
	if _, err := h1.Exec(ctx, "ip", "link", "del", vx); err != nil {
		t.Fatal(err)
	}
	eventually(t, 15*time.Second, "device and entries recreated", func() error {
		out, err := h1.Exec(ctx, "bridge", "fdb", "show", "dev", vx)
		if err != nil {
			return err
		}
		if !strings.Contains(string(out), "dst "+h2.Underlay.String()) {
			return fmt.Errorf("fdb: %s", out)
		}
		return nil
	})
	eventually(t, 10*time.Second, "ping after recreation", func() error { return a.Ping(ctx, b.Addr.Addr(), 1) })
}

// addrOf converts a net.IP to a netip.Addr (zero when invalid).
func addrOf(ip net.IP) netip.Addr {
	a, _ := netip.AddrFromSlice(ip)
	return a.Unmap()
}
