package e2e

import (
	"bytes"
	"context"
	"fmt"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"syscall"
	"testing"
	"time"

	"github.com/overlaynet/overlay/internal/simnet"
)

// dockerRootEnv names a directory holding Debian's docker.io, containerd,
// runc and busybox-static packages unpacked (scripts/lib.sh
// ensure_docker): dockerd is run from there, never installed.
const dockerRootEnv = "OVERLAY_DOCKER_ROOT"

// dockerd is a dockerd confined to a simulated host: its network
// namespace, a mount namespace of its own (a private /run, whose
// /run/docker/plugins is the host's plugins directory, where its overlayd
// serves the plugin socket), and its data, exec root and socket in the
// test's directory. It makes no bridge and no iptables rule.
type dockerd struct {
	t    *testing.T
	h    *simnet.Host
	dir  string
	root string
	cmd  *exec.Cmd
	log  bytes.Buffer
}

func startDockerd(t *testing.T, h *simnet.Host) *dockerd {
	t.Helper()
	root := os.Getenv(dockerRootEnv)
	if root == "" {
		t.Skip("skipping: " + dockerRootEnv + " is not set (scripts/test sets it: Debian's docker.io unpacked, never installed)")
	}
	d := &dockerd{t: t, h: h, dir: t.TempDir(), root: root}
	if err := os.MkdirAll(filepath.Dir(h.DockerSocket()), 0o700); err != nil {
		t.Fatal(err)
	}
	d.start()
	t.Cleanup(d.stop)
	return d
}

func (d *dockerd) start() {
	d.t.Helper()
	script := `mount -t tmpfs tmpfs /run && mkdir -p /run/docker/plugins && mount --bind "$1" /run/docker/plugins &&
exec dockerd --data-root "$2/data" --exec-root "$2/exec" --pidfile "$2/docker.pid" -H "unix://$2/docker.sock" \
 --bridge=none --iptables=false --ip6tables=false --ip-forward=false --ip-masq=false --userland-proxy=false --storage-driver=vfs`
	d.cmd = exec.Command("unshare", "--mount", "--propagation", "private", "nsenter", "--net=/run/netns/"+d.h.Name,
		"sh", "-c", script, "dockerd", filepath.Dir(d.h.DockerSocket()), d.dir)
	d.cmd.Env = append(os.Environ(), "PATH="+filepath.Join(d.root, "usr/bin")+":"+filepath.Join(d.root, "usr/sbin")+":"+os.Getenv("PATH"))
	d.cmd.Stdout, d.cmd.Stderr = &d.log, &d.log
	// Its own process group, and SIGTERM should the test die first.
	d.cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
	if err := d.cmd.Start(); err != nil {
		d.t.Fatal(err)
	}
	eventually(d.t, 30*time.Second, d.h.Name+"'s dockerd to answer", func() error {
		_, err := d.docker("info")
		return err
	})
}

func (d *dockerd) stop() {
	if d.cmd == nil || d.cmd.Process == nil {
		return
	}
	syscall.Kill(-d.cmd.Process.Pid, syscall.SIGTERM)
	done := make(chan struct{})
	go func() { d.cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(20 * time.Second):
		syscall.Kill(-d.cmd.Process.Pid, syscall.SIGKILL)
		<-done
	}
	if d.t.Failed() {
		d.t.Logf("--- dockerd of %s ---\n%s", d.h.Name, d.log.String())
	}
	d.cmd = nil
}

// docker runs the docker client against this dockerd.
func (d *dockerd) docker(args ...string) (string, error) {
	cli := filepath.Join(d.root, "usr/bin/docker")
	cmd := exec.Command(cli, append([]string{"-H", "unix://" + filepath.Join(d.dir, "docker.sock")}, args...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("docker %s: %w: %s", strings.Join(args, " "), err, out)
	}
	return strings.TrimSpace(string(out)), nil
}

func (d *dockerd) must(args ...string) string {
	d.t.Helper()
	out, err := d.docker(args...)
	if err != nil {
		d.t.Fatal(err)
	}
	return out
}

// importBusybox makes the image bb:1 from the unpacked busybox-static:
// nothing is pulled from a registry.
func (d *dockerd) importBusybox() {
	d.t.Helper()
	rootfs := filepath.Join(d.dir, "rootfs")
	if err := os.MkdirAll(filepath.Join(rootfs, "bin"), 0o755); err != nil {
		d.t.Fatal(err)
	}
	bb, err := os.ReadFile(filepath.Join(d.root, "bin/busybox"))
	if err != nil {
		d.t.Fatal(err)
	}
	if err := os.WriteFile(filepath.Join(rootfs, "bin/busybox"), bb, 0o755); err != nil {
		d.t.Fatal(err)
	}
	for _, a := range []string{"sh", "ip", "ping", "sleep", "cat"} {
		if err := os.Symlink("busybox", filepath.Join(rootfs, "bin", a)); err != nil {
			d.t.Fatal(err)
		}
	}
	tar := filepath.Join(d.dir, "rootfs.tar")
	if out, err := exec.Command("tar", "-C", rootfs, "-cf", tar, ".").CombinedOutput(); err != nil {
		d.t.Fatalf("tar: %v: %s", err, out)
	}
	d.must("import", tar, "bb:1")
}

// TestDocker: Docker containers on two hosts and a CNI container on a
// third share one overlay network created through Docker, and reach each
// other; removing them leaves no address, endpoint or veth.
func TestDocker(t *testing.T) {
	n := newNet(t, 3)
	h1, h2, h3 := n.Hosts[0], n.Hosts[1], n.Hosts[2]
	d1, d2 := startDockerd(t, h1), startDockerd(t, h2)
	d1.importBusybox()
	d2.importBusybox()

	d1.must("network", "create", "-d", "overlaynet", "--ipam-driver", "overlaynet", "--subnet", "10.30.0.0/16", "--opt", "name=red", "red")
	// Without --subnet, dockerd 20.10 asks for a pool again and again
	// while the one it gets overlaps a route of the host's, as red's
	// blocks are on host 2: the driver refuses that, naming the subnet.
	if out, err := d2.docker("network", "create", "-d", "overlaynet", "--ipam-driver", "overlaynet", "--ipam-opt", "network=red", "red"); err == nil || !strings.Contains(out, "give --subnet 10.30.0.0/16") {
		t.Fatalf("network create on host 2 without --subnet: %v %s", err, out)
	}
	d2.must("network", "create", "-d", "overlaynet", "--ipam-driver", "overlaynet", "--subnet", "10.30.0.0/16", "red")
	if out := ctl(t, n, "network", "list"); !strings.Contains(out, "red") || !strings.Contains(out, "10.30.0.0/16") {
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

	d1.must("rm", "-f", "ca")
	d2.must("rm", "-f", "cb")
	d1.must("network", "rm", "red")
	d2.must("network", "rm", "red")
	// etcd's copy of the addresses follows each host's record within a
	// second or so.
	eventually(t, 15*time.Second, "no Docker endpoint's address left", func() error {
		for _, ep := range endpoints(t, n, "red") {
			if strings.HasPrefix(ep.ContainerID, "docker-") {
				return fmt.Errorf("left: %+v", ep)
			}
		}
		return nil
	})
	for _, h := range []*simnet.Host{h1, h2} {
		if out := ipOut(t, h, "ip", "-o", "link", "show"); strings.Contains(out, "ovd") {
			t.Errorf("%s: a Docker veth is left:\n%s", h.Name, out)
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
