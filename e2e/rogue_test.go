package e2e

import (
	"context"
	"fmt"
	"log/slog"
	"net"
	"net/netip"
	"os"
	"os/exec"
	"os/signal"
	"path/filepath"
	"strconv"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/overlaynet/overlay/gossip"
	"github.com/overlaynet/overlay/internal/simnet"
	"github.com/overlaynet/overlay/overlay"
)

// rogueEnv, when set, makes the test binary a rogue gossip member instead
// of running the tests (see rogueMain). The rogue runs as its own process
// inside a simulated host's namespace, so that every socket memberlist
// opens, listening or dialling, is in that namespace.
const rogueEnv = "OVERLAY_E2E_ROGUE"

// rogue describes a gossip member that lies.
type rogue struct {
	Host     overlay.HostID // the name it gossips under
	Bind     netip.Addr     // its real address, in its namespace
	Port     int            // the port it gossips on
	Underlay netip.Addr     // the underlay address it claims
	MAC      string         // the VTEP MAC it claims
	Join     string         // host:port of a member to join
	KeyFile  string         // "" for no key
}

func (r rogue) env() []string {
	return []string{rogueEnv + "=1", "ROGUE_HOST=" + string(r.Host), "ROGUE_BIND=" + r.Bind.String(), "ROGUE_PORT=" + strconv.Itoa(r.Port),
		"ROGUE_UNDERLAY=" + r.Underlay.String(), "ROGUE_MAC=" + r.MAC,
		"ROGUE_JOIN=" + r.Join, "ROGUE_KEYFILE=" + r.KeyFile}
}

// rogueMain is the rogue member: it gossips what its environment says,
// joins, says "joined" or "join failed" on stdout, and stays until
// SIGTERM.
func rogueMain() int {
	cfg := gossip.DefaultConfig()
	cfg.Host = overlay.HostID(os.Getenv("ROGUE_HOST"))
	cfg.BindAddr = netip.MustParseAddr(os.Getenv("ROGUE_BIND"))
	cfg.BindPort, _ = strconv.Atoi(os.Getenv("ROGUE_PORT"))
	cfg.Underlay = netip.MustParseAddr(os.Getenv("ROGUE_UNDERLAY"))
	mac, err := net.ParseMAC(os.Getenv("ROGUE_MAC"))
	if err != nil {
		fmt.Println("bad mac:", err)
		return 2
	}
	cfg.VTEPMAC = mac
	if f := os.Getenv("ROGUE_KEYFILE"); f != "" {
		if cfg.Keys, err = gossip.LoadKeys(f); err != nil {
			fmt.Println("keys:", err)
			return 2
		}
	}
	cfg.Logger = slog.New(slog.NewTextHandler(os.Stderr, &slog.HandlerOptions{Level: slog.LevelDebug}))
	g, err := gossip.New(cfg)
	if err != nil {
		fmt.Println("gossip:", err)
		return 2
	}
	defer g.Shutdown()
	ctx, stop := signal.NotifyContext(context.Background(), syscall.SIGTERM, syscall.SIGINT)
	defer stop()
	jctx, cancel := context.WithTimeout(ctx, 5*time.Second)
	n, err := g.Join(jctx, []string{os.Getenv("ROGUE_JOIN")})
	cancel()
	if err != nil || n == 0 {
		fmt.Println("join failed:", err)
	} else {
		fmt.Println("joined")
	}
	<-ctx.Done()
	return 0
}

// startRogue runs r in h's namespace until the test ends, and returns
// what it said on stdout once it said it.
func startRogue(t *testing.T, h *simnet.Host, r rogue) string {
	t.Helper()
	out, err := os.CreateTemp(h.DataDir, "rogue-out")
	if err != nil {
		t.Fatal(err)
	}
	logf, err := os.Create(filepath.Join(h.DataDir, "rogue-"+string(r.Host)+".log"))
	if err != nil {
		t.Fatal(err)
	}
	cmd := exec.Command("ip", "netns", "exec", h.Name, os.Args[0])
	cmd.Env = append(os.Environ(), r.env()...)
	cmd.Stdout, cmd.Stderr = out, logf
	if err := cmd.Start(); err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() {
		cmd.Process.Signal(syscall.SIGTERM)
		cmd.Wait()
		out.Close()
		logf.Close()
	})
	var said string
	eventually(t, 15*time.Second, "the rogue member to try to join", func() error {
		b, _ := os.ReadFile(out.Name())
		if said = strings.TrimSpace(string(b)); said == "" {
			return fmt.Errorf("nothing yet")
		}
		return nil
	})
	return said
}

// logHas returns nil once a line of the log at path contains every one of
// subs.
func logHas(path string, subs ...string) error {
	b, _ := os.ReadFile(path)
	for _, line := range strings.Split(string(b), "\n") {
		all := true
		for _, s := range subs {
			all = all && strings.Contains(line, s)
		}
		if all {
			return nil
		}
	}
	return fmt.Errorf("no line of %s has %q", path, subs)
}

// dataplane renders the routes, neighbour and FDB entries of the
// network's VXLAN device on h.
func dataplane(t *testing.T, n *simnet.Net, h *simnet.Host) string {
	t.Helper()
	dev := n.Network.VXLANName()
	return ipOut(t, h, "ip", "-4", "route", "show", "dev", dev) +
		ipOut(t, h, "ip", "-4", "neigh", "show", "dev", dev) +
		ipOut(t, h, "bridge", "fdb", "show", "dev", dev)
}

// TestGossipCannotMoveRoutes replays, from a rogue member confined to a
// third host's namespace, what gossip could do to routes before peers
// were programmed from etcd alone: take the ID of a host whose overlayd
// is down and gossip another underlay address and VTEP MAC for it, and
// gossip a down host's underlay address under an ID of its own. (Blocks
// are no longer gossiped at all: a member cannot even claim one.) Host
// 1's routes, neighbour and FDB entries do not move, and it logs each
// disagreement. A rogue without the gossip key cannot even join.
func TestGossipCannotMoveRoutes(t *testing.T) {
	n := newStoppedNet(t, 3)
	ctx := context.Background()
	h1, h2, h3 := n.Hosts[0], n.Hosts[1], n.Hosts[2]
	for _, h := range []*simnet.Host{h1, h2} {
		if err := h.Start(ctx); err != nil {
			t.Fatal(err)
		}
	}
	victimID, err := os.ReadFile(filepath.Join(h2.DataDir, "host-id"))
	if err != nil {
		t.Fatal(err)
	}
	victim := overlay.HostID(strings.TrimSpace(string(victimID)))
	eventually(t, 20*time.Second, "host 1 to route to host 2", func() error {
		if !strings.Contains(dataplane(t, n, h1), "via "+h2.Underlay.String()) {
			return fmt.Errorf("no route via %s", h2.Underlay)
		}
		return nil
	})
	before := dataplane(t, n, h1)
	join := netip.AddrPortFrom(h1.Underlay, 7946).String()
	h1log := filepath.Join(h1.DataDir, "overlayd.log")

	// The victim's overlayd goes down, and host 1 notices.
	if err := h2.Stop(); err != nil {
		t.Fatal(err)
	}
	eventually(t, 30*time.Second, "host 1 to see host 2 fail", func() error {
		return logHas(h1log, `msg="member left or failed"`, "node="+string(victim))
	})

	// Without the key: no join.
	if said := startRogue(t, h3, rogue{Host: "stranger", Bind: h3.Underlay, Port: 7950, Underlay: h2.Underlay,
		MAC: "02:66:00:00:00:01", Join: join}); !strings.HasPrefix(said, "join failed") {
		t.Fatalf("a rogue without the gossip key: %s", said)
	}

	// Gossips the down host's underlay address under an ID of its own.
	impostor := rogue{Host: "impostor", Bind: h3.Underlay, Port: 7952, Underlay: h2.Underlay, MAC: "02:66:00:00:00:03"}
	// Takes the down host's ID and gossip address (the machine is gone
	// and its address given to the rogue's), and gossips the rogue's own
	// underlay address and a MAC of its own for it, so that the down
	// host's blocks would be routed to the rogue if gossip were believed.
	// memberlist lets a dead member's name be taken only from the address
	// it had.
	takeover := rogue{Host: victim, Bind: h2.Underlay, Port: 7946, Underlay: h3.Underlay, MAC: "02:66:00:00:00:02"}
	for _, r := range []rogue{impostor, takeover} {
		if r.Host == takeover.Host {
			addr := netip.PrefixFrom(h2.Underlay, 24).String()
			ipOut(t, h2, "ip", "addr", "del", addr, "dev", "eth0")
			ipOut(t, h3, "ip", "addr", "add", addr, "dev", "eth0")
			ipOut(t, h1, "ip", "neigh", "flush", "dev", "eth0")
		}
		r.Join, r.KeyFile = join, n.GossipKeyFile()
		if said := startRogue(t, h3, r); said != "joined" {
			t.Fatalf("rogue %s with the key: %s", r.Host, said)
		}
		eventually(t, 20*time.Second, "host 1 to report rogue "+string(r.Host), func() error {
			return logHas(h1log, "ignoring gossip metadata that differs", "member="+string(r.Host))
		})
		// A pass or two more, on the gossip change and on the resync.
		time.Sleep(2500 * time.Millisecond)
		if got := dataplane(t, n, h1); got != before {
			t.Fatalf("rogue %s moved host 1's entries:\n%s\nwant:\n%s", r.Host, got, before)
		}
	}
}
