//go:build linux

package main

import (
	"errors"
	"fmt"

	"github.com/containernetworking/cni/pkg/types"
	"github.com/vishvananda/netlink"
	"github.com/vishvananda/netns"
	"golang.org/x/sys/unix"
)

// netNSHint is the details of every error about a CNI_NETNS that is not
// a network namespace: what the runtime should pass instead.
const netNSHint = "CNI_NETNS must be the path of a network namespace: /proc/<pid>/ns/net, or a bind mount of it such as /run/netns/<name>"

// container is the container's network namespace and, once needed, a
// route netlink handle in it. It is not safe for concurrent use.
type container struct {
	ns     netns.NsHandle
	handle *netlink.Handle // nil until Handle is first called
}

// openContainer opens the network namespace at path (CNI_NETNS). A path
// that cannot be opened, or that is not a network namespace (a regular
// file, a directory, a namespace of another type), gives a CNI error with
// code 8 naming it. Close releases it.
func openContainer(path string) (*container, error) {
	ns, err := openNetNS(path)
	if err != nil {
		return nil, err
	}
	return &container{ns: ns}, nil
}

// Handle returns a route netlink handle in the namespace, opened on the
// first call. Opening one switches the thread's namespace twice: an ADD
// does it after overlayd's early answer, while overlayd flushes the
// allocation, not before its request.
func (c *container) Handle() (*netlink.Handle, error) {
	if c.handle != nil {
		return c.handle, nil
	}
	// A route socket only: a handle opens one socket per family it is
	// given, each through a namespace switch.
	h, err := netlink.NewHandleAt(c.ns, unix.NETLINK_ROUTE)
	if err != nil {
		return nil, types.NewError(types.ErrInternal, "netlink in the container namespace", err.Error())
	}
	c.handle = h
	return h, nil
}

// Close releases the netlink handle, if any, and the namespace.
func (c *container) Close() {
	if c.handle != nil {
		c.handle.Close()
	}
	c.ns.Close()
}

// openNetNS opens the network namespace at path. The open does not
// block on a named pipe and does not make a terminal the controlling
// one, whatever the path turns out to be.
func openNetNS(path string) (netns.NsHandle, error) {
	fd, err := unix.Open(path, unix.O_RDONLY|unix.O_CLOEXEC|unix.O_NONBLOCK|unix.O_NOCTTY, 0)
	if err != nil {
		return netns.None(), types.NewError(types.ErrInvalidNetNS, fmt.Sprintf("open network namespace %q", path), err.Error())
	}
	what, err := netNSMismatch(fd)
	switch {
	case err != nil:
		unix.Close(fd)
		return netns.None(), types.NewError(types.ErrInvalidNetNS, fmt.Sprintf("inspect network namespace %q", path), err.Error())
	case what != "":
		unix.Close(fd)
		return netns.None(), notNetNS(path, what)
	}
	return netns.NsHandle(fd), nil
}

// notNetNS is the CNI error for a CNI_NETNS at path that is not a
// network namespace but what.
func notNetNS(path, what string) *types.Error {
	return types.NewError(types.ErrInvalidNetNS, fmt.Sprintf("CNI_NETNS %q is not a network namespace: it is %s", path, what), netNSHint)
}

// netNSMismatch says what the open file fd is instead of a network
// namespace ("a regular file", "a directory", "a mount namespace"), or
// "" when it is one or when the kernel cannot tell before setns(2): nsfs
// says which type of namespace a file is since Linux 4.11, and on older
// kernels a namespace of another type fails in NewHandleAt, with code
// 999. A namespace file lives in nsfs since Linux 3.19 (kernels before
// it, from 2015, are refused); anything else, /proc/<pid>/ns or
// /proc/<pid>/status included, is named for what it is.
func netNSMismatch(fd int) (string, error) {
	var fs unix.Statfs_t
	if err := unix.Fstatfs(fd, &fs); err != nil {
		return "", fmt.Errorf("statfs: %w", err)
	}
	switch int64(fs.Type) {
	case unix.NSFS_MAGIC:
	default:
		var st unix.Stat_t
		if err := unix.Fstat(fd, &st); err != nil {
			return "", fmt.Errorf("stat: %w", err)
		}
		return fileKind(st.Mode), nil
	}
	typ, err := unix.IoctlRetInt(fd, unix.NS_GET_NSTYPE)
	if errors.Is(err, unix.ENOTTY) {
		return "", nil // before Linux 4.11
	}
	if err != nil {
		return "", fmt.Errorf("namespace type: %w", err)
	}
	if typ == unix.CLONE_NEWNET {
		return "", nil
	}
	return nsKind(typ), nil
}

// fileKind names the type of file of a stat(2) mode.
func fileKind(mode uint32) string {
	switch mode & unix.S_IFMT {
	case unix.S_IFREG:
		return "a regular file"
	case unix.S_IFDIR:
		return "a directory"
	case unix.S_IFCHR:
		return "a character device"
	case unix.S_IFBLK:
		return "a block device"
	case unix.S_IFIFO:
		return "a named pipe"
	case unix.S_IFSOCK:
		return "a socket"
	}
	return fmt.Sprintf("a file of mode %#o", mode&unix.S_IFMT)
}

// nsKind names a namespace of the CLONE_NEW* type typ, as NS_GET_NSTYPE
// returns it.
func nsKind(typ int) string {
	switch typ {
	case unix.CLONE_NEWNS:
		return "a mount namespace"
	case unix.CLONE_NEWUTS:
		return "a UTS namespace"
	case unix.CLONE_NEWIPC:
		return "an IPC namespace"
	case unix.CLONE_NEWPID:
		return "a PID namespace"
	case unix.CLONE_NEWUSER:
		return "a user namespace"
	case unix.CLONE_NEWCGROUP:
		return "a cgroup namespace"
	case unix.CLONE_NEWTIME:
		return "a time namespace"
	}
	return fmt.Sprintf("a namespace of type %#x", typ)
}
