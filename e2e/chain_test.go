package e2e

import (
	"context"
	"fmt"
	"io"
	"net"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"testing"
	"time"

	"github.com/overlaynet/overlay/internal/simnet"
)

// serveHello answers every connection on l with "hello" and closes it.
func serveHello(l net.Listener) {
	for {
		c, err := l.Accept()
		if err != nil {
			return
		}
		c.Write([]byte("hello"))
		c.Close()
	}
}

// natRules returns the host's NAT rules, from iptables and nftables,
// whichever backend portmap used.
func natRules(t *testing.T, h *simnet.Host) string {
	t.Helper()
	ipt, _ := h.Exec(context.Background(), "iptables-save", "-t", "nat")
	nft, _ := h.Exec(context.Background(), "nft", "list", "ruleset")
	return string(ipt) + string(nft)
}

// dialFrom connects from host h's namespace to addr and reads what the
// server says.
func dialFrom(h *simnet.Host, addr netip.AddrPort) (string, error) {
	var got string
	err := h.InNS(func() error {
		c, err := net.DialTimeout("tcp4", addr.String(), 2*time.Second)
		if err != nil {
			return err
		}
		defer c.Close()
		c.SetDeadline(time.Now().Add(2 * time.Second))
		b, err := io.ReadAll(c)
		got = string(b)
		return err
	})
	return got, err
}

// TestChainPortmapBandwidth: overlay-cni, then the reference portmap and
// bandwidth plugins in one configuration list: ADD, CHECK and DEL pass,
// and the mapped host port answers from another simulated host.
func TestChainPortmapBandwidth(t *testing.T) {
	n := newNet(t, 2)
	ctx := context.Background()
	h1, h2 := n.Hosts[0], n.Hosts[1]
	c, err := n.NewContainer(ctx, h1, "web")
	if err != nil {
		t.Fatal(err)
	}
	c.ConfList = h1.ChainConfList()
	c.CapabilityArgs = map[string]any{
		"portMappings": []map[string]any{{"hostPort": 8080, "containerPort": 80, "protocol": "tcp"}},
		"bandwidth":    map[string]any{"ingressRate": 100_000_000, "ingressBurst": 1_000_000, "egressRate": 100_000_000, "egressBurst": 1_000_000},
	}
	if err := n.Attach(ctx, c); err != nil {
		t.Fatalf("ADD through the chain: %v", err)
	}
	l, err := c.Listen(80)
	if err != nil {
		t.Fatal(err)
	}
	defer l.Close()
	go serveHello(l)

	mapped := netip.AddrPortFrom(h1.Underlay, 8080)
	if got, err := dialFrom(h2, mapped); err != nil || got != "hello" {
		t.Fatalf("host port %s from %s: %q, %v", mapped, h2.Name, got, err)
	}
	if err := n.CheckContainer(ctx, c); err != nil {
		t.Fatalf("CHECK through the chain: %v", err)
	}
	// portmap's NAT rules and bandwidth's shaping carry the container.
	if rules := natRules(t, h1); !strings.Contains(rules, c.ID) {
		t.Fatalf("no NAT rule of portmap names %s:\n%s", c.ID, rules)
	}
	if qd := ipOut(t, h1, "tc", "qdisc", "show", "dev", c.Result.Interfaces[0].Name); !strings.Contains(qd, "tbf") {
		t.Fatalf("bandwidth set no tbf qdisc on the host veth:\n%s", qd)
	}
	if err := n.DelContainer(ctx, c); err != nil {
		t.Fatalf("DEL through the chain: %v", err)
	}
	if rules := natRules(t, h1); strings.Contains(rules, c.ID) {
		t.Fatalf("portmap's NAT rules for %s outlived DEL:\n%s", c.ID, rules)
	}
	released(t, n, c)
}

// TestCNITool drives the plugin chain with cnitool, the reference client:
// add, check and del of a container, as an operator would by hand.
func TestCNITool(t *testing.T) {
	n := newNet(t, 1)
	ctx := context.Background()
	h := n.Hosts[0]
	c, err := n.NewContainer(ctx, h, "tool")
	if err != nil {
		t.Fatal(err)
	}
	confDir := filepath.Join(n.Dir, "net.d")
	if err := os.MkdirAll(confDir, 0o700); err != nil {
		t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(confDir, "10-overlay.conflist"), h.ChainConfList(), 0o600); err != nil {
		t.Fatal(err)
	}
	cnitool := func(verb string) (string, error) {
		out, err := h.Exec(ctx, "env",
			"NETCONFPATH="+confDir,
			"CNI_PATH="+filepath.Dir(bins.cni),
			"CNI_IFNAME=eth0",
			`CAP_ARGS={"portMappings":[{"hostPort":8081,"containerPort":80,"protocol":"tcp"}]}`,
			filepath.Join(filepath.Dir(bins.cni), "cnitool"), verb, "overlay", c.NetNSPath())
		return string(out), err
	}
	// cnitool keeps its results in libcni's default cache: a DEL at the
	// end removes them whatever happened before.
	t.Cleanup(func() { cnitool("del") })
	out, err := cnitool("add")
	if err != nil {
		t.Fatalf("cnitool add: %v\n%s", err, out)
	}
	if !strings.Contains(out, `"interface": 1`) || !strings.Contains(out, `"address": "198.19.`) {
		t.Fatalf("cnitool add printed no overlay address on the container interface:\n%s", out)
	}
	if out, err := cnitool("check"); err != nil {
		t.Fatalf("cnitool check: %v\n%s", err, out)
	}
	for i := range 2 {
		if out, err := cnitool("del"); err != nil {
			t.Fatalf("cnitool del #%d: %v\n%s", i+1, err, out)
		}
	}
	eventually(t, 5*time.Second, "veth gone after cnitool del", func() error {
		if out := ipOut(t, h, "ip", "-o", "link", "show", "type", "veth"); strings.Contains(out, "ovl") {
			return fmt.Errorf("veth left:\n%s", out)
		}
		return nil
	})
}
