package e2e

import (
	"context"
	"fmt"
	"path/filepath"
	"strings"
	"testing"
	"time"

	gocni "github.com/containerd/go-cni"

	"github.com/overlaynet/overlay/internal/simnet"
)

// TestGoCNI drives the plugin through containerd's go-cni, as containerd
// does: its built-in loopback network (cniVersion 0.3.1) first, then
// ours. SetupSerially, because Setup attaches networks from goroutines
// that may run outside the host's namespace.
func TestGoCNI(t *testing.T) {
	n := newNet(t, 1)
	ctx := context.Background()
	h := n.Hosts[0]
	c, err := n.NewContainer(ctx, h, "gocni")
	if err != nil {
		t.Fatal(err)
	}
	c.ID = n.Prefix + "gocni" // go-cni caches under libcni's shared directory: unique per run
	l, err := gocni.New(gocni.WithPluginDir([]string{filepath.Dir(bins.cni)}), gocni.WithInterfacePrefix("eth"), gocni.WithMinNetworkCount(2))
	if err != nil {
		t.Fatal(err)
	}
	if err := l.Load(gocni.WithLoNetwork, gocni.WithConfListBytes(h.CNIConfList())); err != nil {
		t.Fatal(err)
	}
	var res *gocni.Result
	if err := h.InNS(func() (err error) {
		res, err = l.SetupSerially(ctx, c.ID, c.NetNSPath())
		return err
	}); err != nil {
		t.Fatalf("go-cni setup: %v", err)
	}
	// go-cni names interfaces by position: lo is first, ours is eth1.
	var ifName string
	for name, ifc := range res.Interfaces {
		for _, ip := range ifc.IPConfigs {
			if simnet.OverlayCIDR.Contains(addrOf(ip.IP)) && ifc.Sandbox == c.NetNSPath() {
				ifName = name
				t.Logf("go-cni: %s has %s", name, ip.IP)
			}
		}
	}
	if ifName == "" {
		t.Fatalf("go-cni result has no overlay address in the sandbox: %+v", res.Interfaces)
	}
	if !allocatedIf(t, n, c, ifName) {
		t.Fatalf("overlayd holds no address for %s/%s after go-cni setup", c.ID, ifName)
	}
	// go-cni's CHECK stops at its own loopback network: libcni refuses
	// CHECK for cniVersion 0.3.1. A limit of the client, noted in
	// docs/cni.md; CHECK itself is covered through libcni and cnitool.
	err = h.InNS(func() error { return l.Check(ctx, c.ID, c.NetNSPath()) })
	if err != nil && !strings.Contains(err.Error(), "0.3.1") {
		t.Fatalf("go-cni check: %v", err)
	}
	for i := range 2 {
		if err := h.InNS(func() error { return l.Remove(ctx, c.ID, c.NetNSPath()) }); err != nil {
			t.Fatalf("go-cni remove #%d: %v", i+1, err)
		}
	}
	eventually(t, 5*time.Second, "address released after go-cni remove", func() error {
		if allocatedIf(t, n, c, ifName) {
			return fmt.Errorf("still allocated")
		}
		return nil
	})
}
