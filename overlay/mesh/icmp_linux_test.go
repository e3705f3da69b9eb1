package mesh

import (
	"context"
	"crypto/rand"
	"encoding/hex"
	"errors"
	"net/netip"
	"os"
	"os/exec"
	"runtime"
	"strings"
	"testing"
	"time"

	"github.com/vishvananda/netns"
)

// ip runs the ip command, failing the test when it fails.
func ip(t *testing.T, args ...string) {
	t.Helper()
	if out, err := exec.Command("ip", args...).CombinedOutput(); err != nil {
		t.Fatalf("ip %s: %v: %s", strings.Join(args, " "), err, out)
	}
}

// twoNamespaces makes namespaces a (10.9.0.1/24) and b (10.9.0.2/24)
// joined by a veth pair of MTU 1450, removed when the test ends.
func twoNamespaces(t *testing.T) (a, b string) {
	if os.Geteuid() != 0 {
		t.Skip("skipping: needs root to create network namespaces and a raw ICMP socket (run the tests as root)")
	}
	if _, err := exec.LookPath("ip"); err != nil {
		t.Skip("skipping: needs the ip command of iproute2")
	}
	buf := make([]byte, 3)
	rand.Read(buf)
	prefix := "ovms" + hex.EncodeToString(buf)
	a, b = prefix+"-a", prefix+"-b"
	for _, ns := range []string{a, b} {
		ip(t, "netns", "add", ns)
		t.Cleanup(func() { exec.Command("ip", "netns", "del", ns).Run() })
		ip(t, "-n", ns, "link", "set", "lo", "up")
	}
	ip(t, "-n", a, "link", "add", "m0", "mtu", "1450", "type", "veth", "peer", "name", "m0", "netns", b)
	ip(t, "-n", b, "link", "set", "m0", "mtu", "1450")
	ip(t, "-n", a, "addr", "add", "10.9.0.1/24", "dev", "m0")
	ip(t, "-n", b, "addr", "add", "10.9.0.2/24", "dev", "m0")
	ip(t, "-n", a, "link", "set", "m0", "up")
	ip(t, "-n", b, "link", "set", "m0", "up")
	return a, b
}

// listenIn opens the pinger inside namespace name.
func listenIn(t *testing.T, name string) *ICMP {
	t.Helper()
	runtime.LockOSThread()
	defer runtime.UnlockOSThread()
	orig, err := netns.Get()
	if err != nil {
		t.Fatal(err)
	}
	defer orig.Close()
	target, err := netns.GetFromName(name)
	if err != nil {
		t.Fatal(err)
	}
	defer target.Close()
	if err := netns.Set(target); err != nil {
		t.Fatal(err)
	}
	defer netns.Set(orig)
	c, err := ListenICMP()
	if err != nil {
		t.Fatal(err)
	}
	t.Cleanup(func() { c.Close() })
	return c
}

// TestICMP: a probe is answered, up to the path's MTU; a larger one
// cannot be sent, as it may not be fragmented; one to nobody is lost.
func TestICMP(t *testing.T) {
	a, _ := twoNamespaces(t)
	c := listenIn(t, a)
	ctx := context.Background()
	peer := netip.MustParseAddr("10.9.0.2")
	for _, size := range []int{SmallSize, 1450} {
		ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
		rtt, err := c.Ping(ctx, peer, size)
		cancel()
		if err != nil || rtt <= 0 {
			t.Fatalf("Ping(%d bytes) = %v, %v", size, rtt, err)
		}
	}
	ctx2, cancel := context.WithTimeout(ctx, 2*time.Second)
	defer cancel()
	if _, err := c.Ping(ctx2, peer, 1500); err == nil || !strings.Contains(err.Error(), "MTU") {
		t.Fatalf("Ping of more than the MTU = %v; want it refused as larger than the path's MTU", err)
	}
	ctx3, cancel3 := context.WithTimeout(ctx, 300*time.Millisecond)
	defer cancel3()
	if _, err := c.Ping(ctx3, netip.MustParseAddr("10.9.0.77"), SmallSize); !errors.Is(err, context.DeadlineExceeded) {
		t.Fatalf("Ping of nobody = %v; want it lost", err)
	}
	// Many at once: each reply reaches its own ping.
	errs := make(chan error, 50)
	for range 50 {
		go func() {
			ctx, cancel := context.WithTimeout(ctx, 2*time.Second)
			defer cancel()
			_, err := c.Ping(ctx, peer, SmallSize)
			errs <- err
		}()
	}
	for range 50 {
		if err := <-errs; err != nil {
			t.Fatalf("concurrent ping: %v", err)
		}
	}
}
