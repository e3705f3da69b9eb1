package simnet

import (
	"bytes"
	"context"
	"errors"
	"fmt"
	"os"
	"os/exec"
	"path/filepath"
	"strings"
	"sync"
	"syscall"
	"time"
)

// DockerRootEnv names a directory holding Debian's docker.io, containerd,
// runc and busybox-static packages unpacked (scripts/lib.sh
// ensure_docker): dockerd is run from there, never installed.
const DockerRootEnv = "OVERLAY_DOCKER_ROOT"

// Dockerd is a dockerd confined to a simulated host: its network
// namespace, a mount namespace of its own (a private /run, whose
// /run/docker/plugins is the host's plugins directory, where its overlayd
// serves the plugin socket), and its data, exec root and socket in a
// directory of the caller's. It makes no bridge and no iptables rule of
// its own. The mount namespace is held by a process of its own, and
// containerd runs apart from dockerd, as under systemd: dockerd restarts
// (--live-restore) while the containers keep running.
type Dockerd struct {
	h      *Host
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

// StartDockerd starts containerd and dockerd on h, from the packages
// unpacked in root, keeping their state in dir, and returns once dockerd
// answers. Stop must be called, also when it fails.
func StartDockerd(ctx context.Context, h *Host, root, dir string) (*Dockerd, error) {
	d := &Dockerd{h: h, dir: dir, root: root}
	if err := os.MkdirAll(filepath.Dir(h.DockerSocket()), 0o700); err != nil {
		return d, err
	}
	var err error
	d.holder, err = d.spawn("unshare", "--mount", "--propagation", "private", "sh", "-c",
		`mount -t tmpfs tmpfs /run && mkdir -p /run/docker/plugins && mount --bind "$0" /run/docker/plugins && touch "$1/ready" && exec sleep infinity`,
		filepath.Dir(h.DockerSocket()), d.dir)
	if err != nil {
		return d, err
	}
	if err := poll(ctx, 10*time.Second, func() error {
		_, err := os.Stat(filepath.Join(d.dir, "ready"))
		return err
	}); err != nil {
		return d, fmt.Errorf("%s: the mount namespace: %w", h.Name, err)
	}
	if err := os.WriteFile(filepath.Join(d.dir, "containerd.toml"), []byte("version = 2\n"), 0o600); err != nil {
		return d, err
	}
	d.ctd, err = d.inside("containerd", "--config", filepath.Join(d.dir, "containerd.toml"), "--root", filepath.Join(d.dir, "ctd"),
		"--state", filepath.Join(d.dir, "ctd-state"), "--address", filepath.Join(d.dir, "containerd.sock"))
	if err != nil {
		return d, err
	}
	return d, d.Start(ctx)
}

// poll calls f until it succeeds or within passes, and returns its last
// error.
func poll(ctx context.Context, within time.Duration, f func() error) error {
	ctx, cancel := context.WithTimeout(ctx, within)
	defer cancel()
	for {
		err := f()
		if err == nil {
			return nil
		}
		select {
		case <-ctx.Done():
			return err
		case <-time.After(50 * time.Millisecond):
		}
	}
}

// Host returns the simulated host dockerd runs on.
func (d *Dockerd) Host() *Host { return d.h }

// Log returns what containerd and dockerd have written.
func (d *Dockerd) Log() string { return d.log.String() }

// cgroupParent is the cgroup of the containers of this dockerd: one of
// the run's, named like the host, removed by Stop.
func (d *Dockerd) cgroupParent() string { return "/" + d.h.Name }

// spawn starts a command in a process group of its own, its output in
// d.log.
func (d *Dockerd) spawn(name string, args ...string) (*exec.Cmd, error) {
	cmd := exec.Command(name, args...)
	cmd.Env = append(os.Environ(), "PATH="+filepath.Join(d.root, "usr/bin")+":"+filepath.Join(d.root, "usr/sbin")+":"+os.Getenv("PATH"))
	cmd.Stdout, cmd.Stderr = &d.log, &d.log
	// SIGTERM should the caller die first.
	cmd.SysProcAttr = &syscall.SysProcAttr{Setpgid: true, Pdeathsig: syscall.SIGTERM}
	if err := cmd.Start(); err != nil {
		return nil, fmt.Errorf("start %s: %w", name, err)
	}
	return cmd, nil
}

// inside starts a command in the host's network namespace and the mount
// namespace of d.holder.
func (d *Dockerd) inside(name string, args ...string) (*exec.Cmd, error) {
	return d.spawn("nsenter", append([]string{"-t", fmt.Sprint(d.holder.Process.Pid), "-m", "--net=/run/netns/" + d.h.Name, name}, args...)...)
}

// Start starts dockerd (after Crash or a stop of Restart's) and returns
// once it answers.
func (d *Dockerd) Start(ctx context.Context) error {
	var err error
	d.cmd, err = d.inside("dockerd", "--data-root", filepath.Join(d.dir, "data"), "--exec-root", filepath.Join(d.dir, "exec"),
		"--pidfile", filepath.Join(d.dir, "docker.pid"), "-H", "unix://"+filepath.Join(d.dir, "docker.sock"),
		"--containerd", filepath.Join(d.dir, "containerd.sock"), "--live-restore", "--cgroup-parent", d.cgroupParent(),
		"--bridge=none", "--iptables=false", "--ip6tables=false", "--ip-forward=false", "--ip-masq=false", "--userland-proxy=false", "--storage-driver=vfs")
	if err != nil {
		return err
	}
	if err := poll(ctx, 30*time.Second, func() error {
		_, err := d.Docker(ctx, "info")
		return err
	}); err != nil {
		return fmt.Errorf("%s's dockerd does not answer: %w", d.h.Name, err)
	}
	return nil
}

// Crash kills dockerd (SIGKILL), leaving its containers running.
func (d *Dockerd) Crash() {
	d.cmd.Process.Kill()
	d.cmd.Wait()
	d.cmd = nil
}

// Restart stops dockerd alone, leaving its containers running
// (--live-restore), and starts it again. It returns how dockerd's stop
// ended, when not with success, beside an error of the start's.
func (d *Dockerd) Restart(ctx context.Context) (stopped, err error) {
	d.cmd.Process.Signal(syscall.SIGTERM)
	stopped = d.cmd.Wait()
	d.cmd = nil
	return stopped, d.Start(ctx)
}

// Stop removes the containers, then stops dockerd, containerd and every
// process left in the mount namespace (the containers' shims), and the
// holder, so that it is gone, with the cgroups of its containers.
func (d *Dockerd) Stop() {
	ctx := context.Background()
	var ids []string
	if d.cmd != nil {
		if out, err := d.Docker(ctx, "ps", "-aq", "--no-trunc"); err == nil {
			ids = strings.Fields(out)
		}
		if len(ids) > 0 {
			d.Docker(ctx, append([]string{"rm", "-f"}, ids...)...)
		}
		d.cmd.Process.Signal(syscall.SIGTERM)
		waitExit(d.cmd, 20*time.Second)
	}
	// A container dockerd lost track of (a run that failed half way) is
	// still in its cgroup: kill what is there, and remove the cgroups,
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

// Docker runs the docker client against this dockerd and returns its
// output, trimmed.
func (d *Dockerd) Docker(ctx context.Context, args ...string) (string, error) {
	cli := filepath.Join(d.root, "usr/bin/docker")
	cmd := exec.CommandContext(ctx, cli, append([]string{"-H", "unix://" + filepath.Join(d.dir, "docker.sock")}, args...)...)
	out, err := cmd.CombinedOutput()
	if err != nil {
		return string(out), fmt.Errorf("docker %s: %w: %s", strings.Join(args, " "), err, out)
	}
	return strings.TrimSpace(string(out)), nil
}

// ImportBusybox makes the image bb:1 from the unpacked busybox-static:
// nothing is pulled from a registry.
func (d *Dockerd) ImportBusybox(ctx context.Context) error {
	rootfs := filepath.Join(d.dir, "rootfs")
	if err := os.MkdirAll(filepath.Join(rootfs, "bin"), 0o755); err != nil {
		return err
	}
	bb, err := os.ReadFile(filepath.Join(d.root, "bin/busybox"))
	if err != nil {
		return err
	}
	if err := os.WriteFile(filepath.Join(rootfs, "bin/busybox"), bb, 0o755); err != nil {
		return err
	}
	for _, a := range []string{"sh", "ip", "ping", "sleep", "cat"} {
		if err := os.Symlink("busybox", filepath.Join(rootfs, "bin", a)); err != nil && !errors.Is(err, os.ErrExist) {
			return err
		}
	}
	tar := filepath.Join(d.dir, "rootfs.tar")
	if out, err := exec.CommandContext(ctx, "tar", "-C", rootfs, "-cf", tar, ".").CombinedOutput(); err != nil {
		return fmt.Errorf("tar: %w: %s", err, out)
	}
	_, err = d.Docker(ctx, "import", tar, "bb:1")
	return err
}
