package e2e

import (
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"os/exec"
	"strings"
	"testing"
	"time"

	"github.com/overlaynet/overlay/ctlapi"
	"github.com/overlaynet/overlay/internal/simnet"
	"github.com/overlaynet/overlay/overlay/firewall"
)

// hostCtl runs overlayctl on host h and returns its output and exit code.
func hostCtl(t *testing.T, h *simnet.Host, args ...string) (string, int) {
	t.Helper()
	out, err := h.Ctl(context.Background(), args...)
	var exit *exec.ExitError
	switch {
	case err == nil:
		return string(out), 0
	case errors.As(err, &exit):
		return string(out), exit.ExitCode()
	}
	t.Fatalf("%s: overlayctl %s: %v", h.Name, strings.Join(args, " "), err)
	return "", 0
}

// TestOperatorCLI: overlayctl shows a host's status and every host,
// block and address holder; its doctor finds a fault on one host and
// names the fix, and finds a host that is down from anywhere; it releases
// a leaked address and refuses one in use; and it removes a dead host.
func TestOperatorCLI(t *testing.T) {
	n := newStoppedNet(t, 3)
	for _, h := range n.Hosts {
		h.Extra = []string{"--doctor-interval", "1s"}
		if err := h.Start(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	h1, h2, h3 := n.Hosts[0], n.Hosts[1], n.Hosts[2]
	c1, c2 := pair(t, n, h1, "c1", h2, "c2")
	id1, id3 := hostID(t, h1), hostID(t, h3)

	eventually(t, 20*time.Second, "host 1's status shows its network and its peers alive", func() error {
		out, code := hostCtl(t, h1, "status", "--json")
		var st ctlapi.Status
		if code != 0 || json.Unmarshal([]byte(out), &st) != nil {
			return fmt.Errorf("exit %d: %s", code, out)
		}
		if st.Host != id1 || len(st.Networks) != 1 || !st.Networks[0].Ready || st.Networks[0].Addresses != 1 || st.Networks[0].PeersProgrammed != 2 || len(st.Peers) != 2 {
			return fmt.Errorf("status %+v", st)
		}
		for _, p := range st.Peers {
			if p.Gossip != "alive" {
				return fmt.Errorf("peer %s: gossip %s", p.Host, p.Gossip)
			}
		}
		return nil
	})
	if out, code := hostCtl(t, h1, "status"); code != 0 || !strings.Contains(out, "liveness key  held") || !strings.Contains(out, "encrypted") {
		t.Fatalf("status: %d\n%s", code, out)
	}
	eventually(t, 20*time.Second, "a healthy cluster: every host's doctor finds nothing", func() error {
		out, code := hostCtl(t, h1, "doctor")
		if code != 0 || strings.Count(out, ": ok, checked") != 3 {
			return fmt.Errorf("exit %d:\n%s", code, out)
		}
		return nil
	})

	// A fault on host 2 alone: forwarding turned off behind overlayd.
	ipOut(t, h2, "sysctl", "-qw", "net.ipv4.ip_forward=0")
	out, code := hostCtl(t, h2, "doctor", "--local")
	if code != 3 || !strings.Contains(out, "IPv4 forwarding is off") || !strings.Contains(out, "fix: overlayd turns it on when it starts") {
		t.Fatalf("doctor --local with forwarding off: exit %d\n%s", code, out)
	}
	eventually(t, 20*time.Second, "the cluster's doctor names host 2's fault from host 1", func() error {
		out, code := hostCtl(t, h1, "doctor")
		if code != 3 || !strings.Contains(out, "host "+string(hostID(t, h2))+": 1 error") || !strings.Contains(out, "IPv4 forwarding is off") {
			return fmt.Errorf("exit %d:\n%s", code, out)
		}
		return nil
	})
	ipOut(t, h2, "sysctl", "-qw", "net.ipv4.ip_forward=1")

	// The firewall's table deleted by hand is a finding until overlayd
	// writes it again.
	ipOut(t, h2, "nft", "delete", "table", "ip", firewall.TableName)
	if out, code := hostCtl(t, h2, "doctor", "--local"); code == 3 {
		if !strings.Contains(out, "lacks the rule") {
			t.Errorf("doctor --local without the firewall table: %s", out)
		}
	} else {
		t.Logf("overlayd rewrote its table before the doctor looked (exit %d)", code)
	}
	eventually(t, 20*time.Second, "overlayd writes its table again", func() error {
		if out, code := hostCtl(t, h2, "doctor", "--local"); code != 0 {
			return fmt.Errorf("exit %d:\n%s", code, out)
		}
		return nil
	})

	// Who holds an address, a leaked address released, one in use
	// refused.
	c3 := addContainer(t, n, h1, "c3")
	a3 := c3.Addr.Addr().String()
	eventually(t, 10*time.Second, "etcd's copy names c3's holder", func() error {
		if out, _ := hostCtl(t, h2, "address", "holder", n.Network.Name, a3); !strings.Contains(out, "held by container c3") {
			return errors.New(out)
		}
		return nil
	})
	if err := c3.RemoveNetNS(context.Background()); err != nil {
		t.Fatal(err)
	}
	if out, code := hostCtl(t, h1, "address", "release", n.Network.Name, c1.Addr.Addr().String()); code != 1 || !strings.Contains(out, "still attached") {
		t.Fatalf("release of a running container's address: exit %d: %s", code, out)
	}
	eventually(t, 10*time.Second, "c3's veth goes with its namespace, and its leaked address is released", func() error {
		out, code := hostCtl(t, h1, "address", "release", n.Network.Name, a3)
		if code != 0 || !strings.Contains(out, "held by container c3") {
			return fmt.Errorf("exit %d: %s", code, out)
		}
		return nil
	})
	if allocated(t, n, c3) {
		t.Fatal("c3 still holds its address after the release")
	}
	if err := c1.Ping(context.Background(), c2.Addr.Addr(), 1); err != nil {
		t.Fatalf("c1 lost c2 after the release: %v", err)
	}

	// Host 3 goes down: the doctor says so from anywhere, and removing it
	// frees its block.
	if err := h3.Stop(); err != nil {
		t.Fatal(err)
	}
	eventually(t, 30*time.Second, "host 3's liveness key expires and the doctor names it", func() error {
		out, code := hostCtl(t, h2, "doctor")
		if code != 3 || !strings.Contains(out, "host "+string(id3)+": 1 error") || !strings.Contains(out, "overlayctl host remove "+string(id3)) {
			return fmt.Errorf("exit %d:\n%s", code, out)
		}
		return nil
	})
	if out, code := hostCtl(t, h1, "host", "list"); code != 0 || !strings.Contains(out, string(id3)) || !strings.Contains(out, "down") {
		t.Fatalf("host list: %d\n%s", code, out)
	}
	if out, code := hostCtl(t, h1, "block", "list", "--host", string(id3)); code != 0 || !strings.Contains(out, "down") {
		t.Fatalf("block list --host: %d\n%s", code, out)
	}
	if out, code := hostCtl(t, h1, "host", "remove", string(id3)); code != 0 || !strings.Contains(out, "removed host "+string(id3)) {
		t.Fatalf("host remove: %d %s", code, out)
	}
	eventually(t, 20*time.Second, "host 3 is gone from the doctor, and the others drop its routes", func() error {
		out, code := hostCtl(t, h1, "doctor")
		if code != 0 || strings.Contains(out, string(id3)) {
			return fmt.Errorf("doctor: exit %d:\n%s", code, out)
		}
		if routes := ipOut(t, h1, "ip", "-4", "route", "show", "dev", n.Network.VXLANName()); strings.Contains(routes, h3.Underlay.String()) {
			return fmt.Errorf("routes: %s", routes)
		}
		return nil
	})
}

// meshOf returns host h's health mesh counts of the default network, from
// overlayctl status.
func meshOf(t *testing.T, h *simnet.Host) map[string]int {
	t.Helper()
	out, code := hostCtl(t, h, "status", "--json")
	var st ctlapi.Status
	if code != 0 || json.Unmarshal([]byte(out), &st) != nil || len(st.Networks) != 1 {
		t.Fatalf("%s: status: exit %d: %s", h.Name, code, out)
	}
	return st.Networks[0].Mesh
}

// TestHealthMesh: every host probes every peer across the overlay; a path
// too narrow for the overlay's MTU between hosts 1 and 3, and the VXLAN
// port blocked between hosts 1 and 2, each show on that pair alone, and
// the doctor names them with the fix; once mended, all are reachable.
func TestHealthMesh(t *testing.T) {
	n := newStoppedNet(t, 3)
	for _, h := range n.Hosts {
		h.Extra = []string{"--mesh-interval", "300ms", "--doctor-interval", "1s"}
		if err := h.Start(context.Background()); err != nil {
			t.Fatal(err)
		}
	}
	h1, h2, h3 := n.Hosts[0], n.Hosts[1], n.Hosts[2]
	for _, h := range n.Hosts {
		eventually(t, 20*time.Second, h.Name+" reaches both peers", func() error {
			if m := meshOf(t, h); m["reachable"] != 2 {
				return fmt.Errorf("mesh %v", m)
			}
			return nil
		})
	}

	// The faults, in the underlay's bridge: full-size VXLAN packets
	// between hosts 1 and 3 dropped, and all VXLAN between 1 and 2.
	u1, u2, u3 := h1.Underlay.String(), h2.Underlay.String(), h3.Underlay.String()
	port := fmt.Sprint(n.Network.Port)
	rules := fmt.Sprintf(`table bridge fault {
	chain faults {
		type filter hook forward priority 0;
		ip saddr { %[1]s, %[3]s } ip daddr { %[1]s, %[3]s } udp dport %[4]s meta length > 1400 drop
		ip saddr { %[1]s, %[2]s } ip daddr { %[1]s, %[2]s } udp dport %[4]s drop
	}
}
`, u1, u2, u3, port)
	nft := exec.Command("ip", "netns", "exec", n.Underlay, "nft", "-f", "-")
	nft.Stdin = strings.NewReader(rules)
	if out, err := nft.CombinedOutput(); err != nil {
		t.Fatalf("nft: %v: %s", err, out)
	}
	mended := false
	mend := func() {
		if !mended {
			mended = true
			if out, err := exec.Command("ip", "netns", "exec", n.Underlay, "nft", "delete", "table", "bridge", "fault").CombinedOutput(); err != nil {
				t.Errorf("nft delete: %v: %s", err, out)
			}
		}
	}
	defer mend()

	for _, c := range []struct {
		h    *simnet.Host
		want map[string]int
	}{
		{h1, map[string]int{"unreachable": 1, "mtu": 1}},
		{h2, map[string]int{"unreachable": 1, "reachable": 1}},
		{h3, map[string]int{"mtu": 1, "reachable": 1}},
	} {
		eventually(t, 20*time.Second, c.h.Name+"'s mesh shows its faulty pairs alone", func() error {
			if m := meshOf(t, c.h); fmt.Sprint(m) != fmt.Sprint(c.want) {
				return fmt.Errorf("mesh %v, want %v", m, c.want)
			}
			return nil
		})
	}
	id2, id3 := hostID(t, h2), hostID(t, h3)
	out, code := hostCtl(t, h1, "doctor", "--local")
	if code != 3 || !strings.Contains(out, "host "+string(id2)+" does not answer across the overlay") ||
		!strings.Contains(out, "host "+string(id3)+" answers small probes but not full-size ones") || !strings.Contains(out, "must carry 1500 bytes") {
		t.Fatalf("doctor --local on host 1: exit %d\n%s", code, out)
	}
	if out, code := hostCtl(t, h1, "status"); code != 0 || !strings.Contains(out, "1 UNREACHABLE, 1 MTU TOO SMALL") {
		t.Fatalf("status on host 1: %d\n%s", code, out)
	}

	mend()
	for _, h := range n.Hosts {
		eventually(t, 20*time.Second, h.Name+" reaches both peers again", func() error {
			if m := meshOf(t, h); m["reachable"] != 2 {
				return fmt.Errorf("mesh %v", m)
			}
			return nil
		})
	}
}
