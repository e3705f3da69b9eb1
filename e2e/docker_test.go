package e2e

import (
	"bytes"
	"context"
	"encoding/json"
	"fmt"
	"net"
	"net/http"
	"net/netip"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"testing"
	"time"

	"github.com/overlaynet/overlay/attach"
	"github.com/overlaynet/overlay/internal/simnet"
	"github.com/overlaynet/overlay/overlay"
)

// dockerRootEnv names a directory holding Debian's docker.io, containerd,
// runc and busybox-static packages unpacked (scripts/lib.sh
// ensure_docker): dockerd is run from there, never installed.
const dockerRootEnv = "OVERLAY_DOCKER_ROOT"

// dockerd is a dockerd confined to a simulated host: its network
// namespace, a mount namespace of its own (a private /run, whose
// /run/docker/plugins is the host's plugins directory, where its overlayd
// serves the plugin socket), and its data, exec root and socket in the
// test's directory. It makes no bridge and no iptables rule. The mount
// namespace is held by a process of its own, and containerd runs apart
// from dockerd, as under systemd: dockerd restarts (--live-restore)
// while the containers keep running.
type dockerd struct {
	t      *testing.T
	h      *simnet.Host
	dir    string
	root   string
	holder *exec.Cmd // holds the mount namespace
	ctd    *exec.Cmd // containerd
	cmd    *exec.Cmd // dockerd
	log    lockedBuffer
}

// lockedBuffer collects the output of several processes at once.
type lockedBuffer struct {
	mu  sync.Mutex
	buf bytes.Buffer
}

func (b *lockedBuffer) Write(p []byte) (int, error) {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.Write(p)
}

func (b *lockedBuffer) String() string {
	b.mu.Lock()
	defer b.mu.Unlock()
	return b.buf.String()
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
	t.Cleanup(d.stop)
	d.holder = d.spawn("unshare", "--mount", "--propagation", "private", "sh", "-c",
		`mount -t tmpfs tmpfs /run && mkdir -p /run/docker/plugins && mount --bind "$0" /run/docker/plugins && touch "$1/ready" && exec sleep infinity`,
		filepath.Dir(h.DockerSocket()), d.dir)
	eventually(t, 10*time.Second, "the mount namespace", func() error {
		_, err := os.Stat(filepath.Join(d.dir, "ready"))
		return err
	})
	if err := os.WriteFile(filepath.Join(d.dir, "containerd.toml"), []byte("version = 2\n"), 0o600); err != nil {
		t.Fatal(err)
	}
	d.ctd = d.inside("containerd", "--config", filepath.Join(d.dir, "containerd.toml"), "--root", filepath.Join(d.dir, "ctd"),
		"--state", filepath.Join(d.dir, "ctd-state"), "--address", filepath.Join(d.dir, "containerd.sock"))
	d.start()
	return d
}

// cgroupParent is the cgroup of the containers of this dockerd: one of
// the run's, named like the host, removed at the end.
func (d *dockerd) cgroupParent() string { return "/" + d.h.Name }

// spawn starts a command in a process group of its own, its output in
// d.log.
func (d *dockerd) spawn(name string, args ...string) *exec.Cmd {
	d.t.Helper()
	cmd := exec.Command(name, args...)
	cmd.Env = append(os.Environ(), "PATH="+filepath.Join(d.root, "usr/bin")+":"+filepath.Join(d.root, "usr/sbin")+":"+os.Getenv("PATH"))
	cmd.Stdout, cmd.Stderr = &d.log, &d.log
	// SIGTERM should the test die first.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
	if err := cmd.Start(); err != nil {
		d.t.Fatal(err)
	}
	return cmd
}

// inside starts a command in the host's network namespace and the mount
// namespace of d.holder.
func (d *dockerd) inside(name string, args ...string) *exec.Cmd {
	return d.spawn("nsenter", append([]string{"-t", fmt.Sprint(d.holder.Process.Pid), "-m", "--net=/run/netns/" + d.h.Name, name}, args...)...)
}

func (d *dockerd) start() {
	d.t.Helper()
	d.cmd = d.inside("dockerd", "--data-root", filepath.Join(d.dir, "data"), "--exec-root", filepath.Join(d.dir, "exec"),
		"--pidfile", filepath.Join(d.dir, "docker.pid"), "-H", "unix://"+filepath.Join(d.dir, "docker.sock"),
		"--containerd", filepath.Join(d.dir, "containerd.sock"), "--live-restore", "--cgroup-parent", d.cgroupParent(),
		"--bridge=none", "--iptables=false", "--ip6tables=false", "--ip-forward=false", "--ip-masq=false", "--userland-proxy=false", "--storage-driver=vfs")
	eventually(d.t, 30*time.Second, d.h.Name+"'s dockerd to answer", func() error {
		_, err := d.docker("info")
		return err
	})
}

// crash kills dockerd (SIGKILL), leaving its containers running.
func (d *dockerd) crash() {
	d.t.Helper()
	d.cmd.Process.Kill()
	d.cmd.Wait()
	d.cmd = nil
}

// restart stops dockerd alone, leaving its containers running
// (--live-restore), and starts it again.
func (d *dockerd) restart() {
	d.t.Helper()
	d.cmd.Process.Signal(syscall.SIGTERM)
	if err := d.cmd.Wait(); err != nil {
		d.t.Logf("dockerd of %s exited: %v", d.h.Name, err)
	}
	d.cmd = nil
	d.start()
}

// stop removes the containers, then stops dockerd, containerd and every
// process left in the mount namespace (the containers' shims), and the
// holder, so that it is gone.
func (d *dockerd) stop() {
	var ids []string
	if d.cmd != nil {
		if out, err := d.docker("ps", "-aq", "--no-trunc"); err == nil {
			ids = strings.Fields(out)
		}
		if len(ids) > 0 {
			d.docker(append([]string{"rm", "-f"}, ids...)...)
		}
		d.cmd.Process.Signal(syscall.SIGTERM)
		waitExit(d.cmd, 20*time.Second)
	}
	// A container dockerd lost track of (a test that failed half way)
	// is still in its cgroup: kill what is there, and remove the cgroups,
	// the run's parent too.
	for _, id := range ids {
		dirs, _ := filepath.Glob("/sys/fs/cgroup/*" + d.cgroupParent() + "/" + id)
		for _, dir := range dirs {
			if procs, err := os.ReadFile(filepath.Join(dir, "cgroup.procs")); err == nil {
				for _, f := range strings.Fields(string(procs)) {
					var pid int
					fmt.Sscan(f, &pid)
					syscall.Kill(pid, syscall.SIGKILL)
				}
			}
		}
		time.Sleep(100 * time.Millisecond)
		for _, dir := range dirs {
			os.Remove(dir)
		}
	}
	if d.holder != nil {
		if ns, err := os.Readlink(fmt.Sprintf("/proc/%d/ns/mnt", d.holder.Process.Pid)); err == nil {
			procs, _ := filepath.Glob("/proc/[0-9]*/ns/mnt")
			for _, p := range procs {
				if other, err := os.Readlink(p); err == nil && other == ns {
					var pid int
					fmt.Sscanf(p, "/proc/%d/", &pid)
					if pid != d.holder.Process.Pid {
						syscall.Kill(pid, syscall.SIGKILL)
					}
				}
			}
		}
	}
	parents, _ := filepath.Glob("/sys/fs/cgroup/*" + d.cgroupParent())
	for _, dir := range parents {
		os.Remove(dir)
	}
	for _, c := range []*exec.Cmd{d.ctd, d.holder} {
		if c != nil {
			c.Process.Kill()
			waitExit(c, 10*time.Second)
		}
	}
	if d.t.Failed() {
		d.t.Logf("--- dockerd of %s ---\n%s", d.h.Name, d.log.String())
	}
	d.cmd, d.ctd, d.holder = nil, nil, nil
}

// waitExit waits for cmd to exit, killing it after grace.
func waitExit(cmd *exec.Cmd, grace time.Duration) {
	done := make(chan struct{})
	go func() { cmd.Wait(); close(done) }()
	select {
	case <-done:
	case <-time.After(grace):
		cmd.Process.Kill()
		<-done
	}
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
// other; they keep doing so while dockerd restarts (with --live-restore)
// and while overlayd restarts, and new containers attach after each;
// removing them leaves no address, endpoint or veth.
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
	d2.crash()
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
