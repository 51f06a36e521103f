// What a restored guest's first touch of a page costs, two ways of
// restoring without reading the whole snapshot first: the file mapped
// privately (what Ferry does; the kernel serves the fault from the page
// cache) and userfaultfd (Cloud Hypervisor's on-demand restore: a handler
// thread reads the page and UFFDIO_COPYs it in). Microseconds per page.
//
//   gcc -O2 -pthread tests/scripts/fault_cost.c -o /tmp/fault_cost
//   head -c 512M /dev/urandom > /tmp/f.img && cat /tmp/f.img > /dev/null
//   /tmp/fault_cost /tmp/f.img 512
#define _GNU_SOURCE
#include <fcntl.h>
#include <linux/userfaultfd.h>
#include <poll.h>
#include <pthread.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/ioctl.h>
#include <sys/mman.h>
#include <sys/syscall.h>
#include <time.h>
#include <unistd.h>
#define PG 4096
static int uffd, fd; static char *base; static size_t len;
static double now(){struct timespec t;clock_gettime(CLOCK_MONOTONIC,&t);return t.tv_sec+t.tv_nsec*1e-9;}
static void *handler(void *a){ char *buf=aligned_alloc(PG,PG); for(;;){ struct pollfd p={uffd,POLLIN,0}; poll(&p,1,-1); struct uffd_msg m; if(read(uffd,&m,sizeof m)!=sizeof m) continue; if(m.event!=UFFD_EVENT_PAGEFAULT) continue; unsigned long addr=m.arg.pagefault.address&~(PG-1UL); pread(fd,buf,PG,addr-(unsigned long)base); struct uffdio_copy c={.dst=addr,.src=(unsigned long)buf,.len=PG,.mode=0}; ioctl(uffd,UFFDIO_COPY,&c);} return 0;}
int main(int argc,char**argv){ len=(size_t)atol(argv[2])<<20; fd=open(argv[1],O_RDONLY); volatile unsigned long sum=0; double t0,t1;
 // private file mapping
 char *m=mmap(0,len,PROT_READ|PROT_WRITE,MAP_PRIVATE,fd,0); t0=now(); for(size_t i=0;i<len;i+=PG) sum+=m[i]; t1=now(); printf("mmap private, read-touch: %.2f us/page\n",(t1-t0)/(len/PG)*1e6);
 t0=now(); for(size_t i=0;i<len;i+=PG) m[i]++; t1=now(); printf("mmap private, then write (CoW): %.2f us/page\n",(t1-t0)/(len/PG)*1e6); munmap(m,len);
 m=mmap(0,len,PROT_READ|PROT_WRITE,MAP_PRIVATE,fd,0); t0=now(); for(size_t i=0;i<len;i+=PG) m[i]++; t1=now(); printf("mmap private, first touch a write: %.2f us/page\n",(t1-t0)/(len/PG)*1e6); munmap(m,len);
 // userfaultfd
 uffd=syscall(SYS_userfaultfd,O_CLOEXEC|O_NONBLOCK); if(uffd<0){perror("userfaultfd");return 1;} struct uffdio_api api={.api=UFFD_API}; ioctl(uffd,UFFDIO_API,&api);
 base=mmap(0,len,PROT_READ|PROT_WRITE,MAP_PRIVATE|MAP_ANONYMOUS,-1,0); struct uffdio_register r={.range={(unsigned long)base,len},.mode=UFFDIO_REGISTER_MODE_MISSING}; if(ioctl(uffd,UFFDIO_REGISTER,&r)){perror("register");return 1;}
 pthread_t th; pthread_create(&th,0,handler,0); t0=now(); for(size_t i=0;i<len;i+=PG) sum+=base[i]; t1=now(); printf("userfaultfd (pread + UFFDIO_COPY): %.2f us/page\n",(t1-t0)/(len/PG)*1e6);
 return 0;}
