package e2e

import (
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/overlaynet/overlay/attach"
	"github.com/overlaynet/overlay/internal/simnet"
	"github.com/overlaynet/overlay/overlay"
)

// dockerd is a simnet.Dockerd that fails its test.
type dockerd struct {
	*simnet.Dockerd
	t *testing.T
}

// startDockerd starts a dockerd on h, stopped when the test ends; the
// test is skipped where Debian's docker.io is not unpacked.
func startDockerd(t *testing.T, h *simnet.Host) *dockerd {
	t.Helper()
	root := os.Getenv(simnet.DockerRootEnv)
	if root == "" {
		t.Skip("skipping: " + simnet.DockerRootEnv + " is not set (scripts/test sets it: Debian's docker.io unpacked, never installed)")
	}
	sd, err := simnet.StartDockerd(context.Background(), h, root, t.TempDir())
	d := &dockerd{Dockerd: sd, t: t}
	t.Cleanup(func() {
		sd.Stop()
		if t.Failed() {
			t.Logf("--- dockerd of %s ---\n%s", h.Name, sd.Log())
		}
	})
	if err != nil {
		t.Fatal(err)
	}
	if err := sd.ImportBusybox(context.Background()); err != nil {
		t.Fatal(err)
	}
	return d
}

func (d *dockerd) docker(args ...string) (string, error) {
	return d.Docker(context.Background(), args...)
}

func (d *dockerd) must(args ...string) string {
	d.t.Helper()
	out, err := d.docker(args...)
	if err != nil {
		d.t.Fatal(err)
	}
	return out
}

// restart restarts dockerd, its containers running on.
func (d *dockerd) restart() {
	d.t.Helper()
	stopped, err := d.Restart(context.Background())
	if stopped != nil {
		d.t.Logf("dockerd of %s exited: %v", d.Host().Name, stopped)
	}
	if err != nil {
		d.t.Fatal(err)
	}
}

func (d *dockerd) start() {
	d.t.Helper()
	if err := d.Start(context.Background()); err != nil {
		d.t.Fatal(err)
	}
}

// TestDocker: Docker containers on two hosts and a CNI container on a
// third share one overlay network created through Docker, and reach each
// other; they keep doing so while dockerd restarts (with --live-restore)
// and while overlayd restarts, and new containers attach after each;
// removing them leaves no address, endpoint or veth.
func TestDocker(t *testing.T) {
	n := newNet(t, 3)
	h1, h2, h3 := n.Hosts[0], n.Hosts[1], n.Hosts[2]
	d1, d2 := startDockerd(t, h1), startDockerd(t, h2)

	d1.must("network", "create", "-d", "overlaynet", "--ipam-driver", "overlaynet", "--subnet", "10.30.0.0/16", "--opt", "name=red", "--opt", "label.team=web", "red")
	// Without --subnet, dockerd 20.10 asks for a pool again and again
	// while the one it gets overlaps a route of the host's, as red's
	// blocks are on host 2: the driver refuses that, naming the subnet.
	if out, err := d2.docker("network", "create", "-d", "overlaynet", "--ipam-driver", "overlaynet", "--ipam-opt", "network=red", "red"); err == nil || !strings.Contains(out, "give --subnet 10.30.0.0/16") {
		t.Fatalf("network create on host 2 without --subnet: %v %s", err, out)
	}
	d2.must("network", "create", "-d", "overlaynet", "--ipam-driver", "overlaynet", "--subnet", "10.30.0.0/16", "red")
	if out := ctl(t, n, "network", "list"); !strings.Contains(out, "red") || !strings.Contains(out, "10.30.0.0/16") || !strings.Contains(out, "team=web") {
		t.Fatalf("the network created through Docker is not an overlay network:\n%s", out)
	}
	waitServed(t, n, "red", h1, h2, h3)
	d1.must("run", "-d", "--name", "ca", "--pull", "never", "--network", "red", "bb:1", "sleep", "1000")
	d2.must("run", "-d", "--name", "cb", "--pull", "never", "--network", "red", "bb:1", "sleep", "1000")
	addrOf := func(d *dockerd, name string) string {
		return d.must("inspect", "-f", "{{(index .NetworkSettings.Networks \"red\").IPAddress}}", name)
	}
	b := addrOf(d2, "cb")
	c, err := n.AddContainerOn(context.Background(), h3, "c", "red")
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, 20*time.Second, "Docker container a reaches Docker container b on another host", func() error {
		_, err := d1.docker("exec", "ca", "ping", "-c", "1", "-W", "1", b)
		return err
	})
	eventually(t, 20*time.Second, "Docker container a reaches CNI container c", func() error {
		_, err := d1.docker("exec", "ca", "ping", "-c", "1", "-W", "1", c.Addr.Addr().String())
		return err
	})
	eventually(t, 20*time.Second, "CNI container c reaches Docker container b", func() error {
		return c.Ping(context.Background(), mustAddr(t, b), 1)
	})

	// dockerd restarts (it replays nothing to its plugins), then
	// overlayd: the containers keep their connectivity, and new ones
	// attach.
	d1.restart()
	if _, err := d1.docker("exec", "ca", "ping", "-c", "1", "-W", "2", b); err != nil {
		t.Fatalf("after dockerd restarted: %v", err)
	}
	d1.must("run", "-d", "--name", "ca2", "--pull", "never", "--network", "red", "bb:1", "sleep", "1000")
	if err := h1.Stop(); err != nil {
		t.Fatal(err)
	}
	if _, err := d1.docker("exec", "ca", "ping", "-c", "1", "-W", "2", b); err != nil {
		t.Fatalf("while overlayd is down: %v", err)
	}
	if err := h1.Start(context.Background()); err != nil {
		t.Fatal(err)
	}
	d1.must("run", "-d", "--name", "ca3", "--pull", "never", "--network", "red", "bb:1", "sleep", "1000")
	for _, name := range []string{"ca", "ca2", "ca3"} {
		eventually(t, 20*time.Second, name+" reaches cb after the restarts", func() error {
			_, err := d1.docker("exec", name, "ping", "-c", "1", "-W", "1", b)
			return err
		})
	}

	// A network created with overlayctl is used from Docker, beside a
	// CNI container.
	ctl(t, n, "network", "create", "blue", "--cidr", "10.31.0.0/16")
	waitServed(t, n, "blue", h1, h2, h3)
	d2.must("network", "create", "-d", "overlaynet", "--ipam-driver", "overlaynet", "--subnet", "10.31.0.0/16", "blue")
	d2.must("run", "-d", "--name", "cblue", "--pull", "never", "--network", "blue", "bb:1", "sleep", "1000")
	blue := d2.must("inspect", "-f", "{{(index .NetworkSettings.Networks \"blue\").IPAddress}}", "cblue")
	cBlue, err := n.AddContainerOn(context.Background(), h3, "cblue", "blue")
	if err != nil {
		t.Fatal(err)
	}
	eventually(t, 20*time.Second, "a CNI container reaches a Docker container on a network overlayctl created", func() error {
		return cBlue.Ping(context.Background(), mustAddr(t, blue), 1)
	})
	if err := n.DelContainer(context.Background(), cBlue); err != nil {
		t.Fatal(err)
	}

	// An address dockerd asked for and never made an endpoint of (it
	// crashed in between) is released by the sweep.
	lost := requestAddress(t, h1, "10.30.0.0/16")
	eventually(t, 20*time.Second, "the sweep releases an address without an endpoint", func() error {
		if c := dockerHeld(t, n, "red")[lost]; c != "" {
			return fmt.Errorf("%s still held by %s", lost, c)
		}
		return logHas(filepath.Join(h1.DataDir, "overlayd.log"), "docker: released the address of an endpoint dockerd left", lost+"/")
	})

	// dockerd crashes, and a container dies while it is down: once
	// dockerd is back, its address and veth are gone, and dockerd
	// removes it and runs new ones.
	pid := d2.must("inspect", "-f", "{{.State.Pid}}", "cb")
	d2.Crash()
	var p int
	fmt.Sscan(pid, &p)
	if err := syscall.Kill(p, syscall.SIGKILL); err != nil {
		t.Fatalf("kill container cb (pid %s): %v", pid, err)
	}
	d2.start()
	eventually(t, 30*time.Second, "the address of the container that died with dockerd down released", func() error {
		if c := dockerHeld(t, n, "red")[b]; c != "" {
			return fmt.Errorf("%s still held by %s", b, c)
		}
		if out := ipOut(t, h2, "ip", "-o", "link", "show", "master", "ovbr-red"); strings.Contains(out, overlay.HostVethPrefix) {
			return fmt.Errorf("a veth is still on red's bridge:\n%s", out)
		}
		return nil
	})
	if logHas(filepath.Join(h2.DataDir, "overlayd.log"), "docker: released the address of an endpoint dockerd left", b+"/") == nil {
		t.Logf("the sweep released %s (dockerd did not)", b)
	} else {
		t.Logf("dockerd released %s itself", b)
	}
	d2.must("rm", "-f", "cb")
	d2.must("run", "-d", "--name", "cb2", "--pull", "never", "--network", "red", "bb:1", "sleep", "1000")
	b2 := addrOf(d2, "cb2")
	eventually(t, 20*time.Second, "a new container after dockerd's crash reaches another host", func() error {
		_, err := d1.docker("exec", "ca", "ping", "-c", "1", "-W", "1", b2)
		return err
	})

	d1.must("rm", "-f", "ca", "ca2", "ca3")
	d2.must("rm", "-f", "cb2", "cblue")
	d1.must("network", "rm", "red")
	d2.must("network", "rm", "red", "blue")
	// etcd's copy of the addresses follows each host's record within a
	// second or so.
	eventually(t, 15*time.Second, "no Docker endpoint's address left", func() error {
		for _, network := range []string{"red", "blue"} {
			if held := dockerHeld(t, n, network); len(held) > 0 {
				return fmt.Errorf("left on %s: %v", network, held)
			}
		}
		return nil
	})
	for _, h := range []*simnet.Host{h1, h2} {
		if out := ipOut(t, h, "ip", "-o", "link", "show"); strings.Contains(out, "ovd") || strings.Contains(out, "docker_gwbridge") {
			t.Errorf("%s: a Docker veth, or a gateway bridge of dockerd's, is left:\n%s", h.Name, out)
		}
	}
}

func mustAddr(t *testing.T, s string) netip.Addr {
	t.Helper()
	a, err := netip.ParseAddr(s)
	if err != nil {
		t.Fatalf("address %q: %v", s, err)
	}
	return a
}

// dockerHeld returns the addresses of network that Docker attachments
// hold, and their container IDs.
func dockerHeld(t *testing.T, n *simnet.Net, network string) map[string]string {
	t.Helper()
	out := map[string]string{}
	for _, ep := range endpoints(t, n, network) {
		if strings.HasPrefix(ep.ContainerID, attach.DockerKeyPrefix) {
			out[ep.Addr.Addr().String()] = ep.ContainerID
		}
	}
	return out
}

// requestAddress asks h's overlayd for an address of pool, as dockerd
// does first when it starts a container, and returns it.
func requestAddress(t *testing.T, h *simnet.Host, pool string) string {
	t.Helper()
	c := http.Client{Transport: &http.Transport{DialContext: func(ctx context.Context, _, _ string) (net.Conn, error) {
		return (&net.Dialer{}).DialContext(ctx, "unix", h.DockerSocket())
	}}, Timeout: 10 * time.Second}
	resp, err := c.Post("http://plugin/IpamDriver.RequestAddress", "application/vnd.docker.plugins.v1.2+json", strings.NewReader(`{"PoolID":"`+pool+`"}`))
	if err != nil {
		t.Fatal(err)
	}
	defer resp.Body.Close()
	var r struct{ Address, Err string }
	if err := json.NewDecoder(resp.Body).Decode(&r); err != nil || resp.StatusCode != http.StatusOK {
		t.Fatalf("RequestAddress: %s %+v %v", resp.Status, r, err)
	}
	p, err := netip.ParsePrefix(r.Address)
	if err != nil {
		t.Fatalf("RequestAddress answered %q: %v", r.Address, err)
	}
	return p.Addr().String()
}
