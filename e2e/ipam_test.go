package e2e

import (
	"context"
	"fmt"
	"net/netip"
	"os"
	"path/filepath"
	"slices"
	"strings"
	"testing"
	"time"

	"github.com/overlaynet/overlay/internal/simnet"
	"github.com/overlaynet/overlay/overlay"
)

// blocksOf returns the blocks etcd says host h owns, sorted.
func blocksOf(t *testing.T, n *simnet.Net, h overlay.HostID) []netip.Prefix {
	t.Helper()
	_, owners := hostRecords(t, n)
	var out []netip.Prefix
	for b, o := range owners {
		if o == h {
			out = append(out, b)
		}
	}
	slices.SortFunc(out, func(a, b netip.Prefix) int { return a.Addr().Compare(b.Addr()) })
	return out
}

// hostID returns the ID of the overlayd of h.
func hostID(t *testing.T, h *simnet.Host) overlay.HostID {
	t.Helper()
	b, err := os.ReadFile(filepath.Join(h.DataDir, "host-id"))
	if err != nil {
		t.Fatal(err)
	}
	return overlay.HostID(strings.TrimSpace(string(b)))
}

// routesTo returns the overlay routes of h, one per line.
func routesTo(t *testing.T, n *simnet.Net, h *simnet.Host) string {
	t.Helper()
	return ipOut(t, h, "ip", "-4", "route", "show", "dev", n.Network.VXLANName())
}

// TestBlocksOnDemand: 150 containers on one host get addresses across
// three blocks, claimed as the host fills up; the other host routes every
// one of them, and every container reaches a container on the other host.
func TestBlocksOnDemand(t *testing.T) {
	n := newNet(t, 2)
	ctx := context.Background()
	h1, h2 := n.Hosts[0], n.Hosts[1]
	far := addContainer(t, n, h2, "far")
	var cs []*simnet.Container
	seen := make(map[netip.Addr]string)
	for i := range 150 {
		c := addContainer(t, n, h1, fmt.Sprintf("c%03d", i))
		if prev, dup := seen[c.Addr.Addr()]; dup {
			t.Fatalf("%s given to %s and %s", c.Addr, prev, c.ID)
		}
		seen[c.Addr.Addr()] = c.ID
		cs = append(cs, c)
	}
	blocks := make(map[netip.Prefix]int)
	for _, c := range cs {
		blocks[c.Addr.Masked()]++
	}
	if len(blocks) != 3 {
		t.Fatalf("150 containers in blocks %v: want 3 blocks", blocks)
	}
	owned := blocksOf(t, n, hostID(t, h1))
	for b := range blocks {
		if !slices.Contains(owned, b) {
			t.Fatalf("container addresses in %s, which etcd does not give host 1 (%v)", b, owned)
		}
	}
	eventually(t, 10*time.Second, "host 2 routes every block of host 1", func() error {
		routes := routesTo(t, n, h2)
		for b := range blocks {
			if !strings.Contains(routes, b.String()) {
				return fmt.Errorf("no route to %s:\n%s", b, routes)
			}
		}
		return nil
	})
	eventually(t, 20*time.Second, "first ping", func() error { return cs[0].Ping(ctx, far.Addr.Addr(), 1) })
	for _, c := range cs {
		if err := c.Ping(ctx, far.Addr.Addr(), 1); err != nil {
			t.Fatalf("%s (%s) cannot reach %s on host 2: %v", c.ID, c.Addr, far.Addr, err)
		}
	}
}

// TestDeadHostReclaimedAndReturns: a host killed for good has its blocks
// freed once its liveness key has been gone for the reclaim period, and
// the other hosts remove its routes; when it comes back it gets a new
// block, names the containers stranded in the old one, fails CHECK for
// them, and serves new containers that reach the other hosts.
func TestDeadHostReclaimedAndReturns(t *testing.T) {
	n := newStoppedNet(t, 3)
	ctx := context.Background()
	for _, h := range n.Hosts {
		h.Extra = []string{"--reclaim-after", "2s"}
		if err := h.Start(ctx); err != nil {
			t.Fatal(err)
		}
	}
	h1, h3 := n.Hosts[0], n.Hosts[2]
	c1, c3 := pair(t, n, h1, "one", h3, "three")
	id3 := hostID(t, h3)
	old := blocksOf(t, n, id3)
	if len(old) != 1 {
		t.Fatalf("host 3 owns %v", old)
	}
	if err := h3.Kill(); err != nil {
		t.Fatal(err)
	}
	// The liveness lease (10 s) runs out, a host notes it gone, and 2 s
	// later its block is freed.
	eventually(t, 40*time.Second, "host 3's block freed and its route gone", func() error {
		if b := blocksOf(t, n, id3); len(b) != 0 {
			return fmt.Errorf("host 3 still owns %v", b)
		}
		if routes := routesTo(t, n, h1); strings.Contains(routes, old[0].String()) {
			return fmt.Errorf("host 1 still routes %s:\n%s", old[0], routes)
		}
		return nil
	})
	logged := false
	for _, h := range n.Hosts[:2] {
		if logHas(filepath.Join(h.DataDir, "overlayd.log"), "freed the blocks of a host whose liveness key is gone", string(id3), old[0].String()) == nil {
			logged = true
		}
	}
	if !logged {
		t.Fatal("no host logged that it freed host 3's block")
	}

	// Host 3 comes back with its data directory: its container still
	// holds an address of the block it lost.
	if err := h3.Start(ctx); err != nil {
		t.Fatal(err)
	}
	now := blocksOf(t, n, id3)
	if len(now) != 1 || now[0] == old[0] {
		t.Fatalf("the returning host holds %v: want one block other than %s", now, old[0])
	}
	if err := logHas(filepath.Join(h3.DataDir, "overlayd.log"), "level=ERROR", "blocks of this host were reclaimed or removed while it was away", old[0].String(), c3.ID); err != nil {
		t.Fatalf("no ERROR naming the lost block and its container: %v", err)
	}
	err := n.CheckContainer(ctx, c3)
	if err == nil || !strings.Contains(err.Error(), "recreate the container") {
		t.Fatalf("CHECK of a stranded container = %v; want a failure asking to recreate it", err)
	}
	fresh := addContainer(t, n, h3, "fresh")
	if fresh.Addr.Masked() != now[0] {
		t.Fatalf("new container got %s, outside the new block %s", fresh.Addr, now[0])
	}
	eventually(t, 20*time.Second, "the new container reaches host 1", func() error { return fresh.Ping(ctx, c1.Addr.Addr(), 1) })
	// DEL of the stranded container frees it for good.
	if err := n.DelContainer(ctx, c3); err != nil {
		t.Fatalf("DEL of a stranded container: %v", err)
	}
}
